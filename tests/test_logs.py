"""The console level (spo_ray/logs.py): known-benign warnings and library INFO lines go by default, real warnings
stay, and 'info' shows everything."""

from __future__ import annotations

import io
import logging

import pytest

from spo_ray.logs import LEVEL_ENV, configure_logging, process_env


@pytest.fixture
def console(monkeypatch):
    """A handler on a library logger (as vLLM and Ray install theirs), writing to a buffer."""
    for name in (LEVEL_ENV, "VLLM_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS"):  # restored afterwards
        monkeypatch.setenv(name, "")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    logging.getLogger("vllm").addHandler(handler)
    yield logger, stream
    logging.getLogger("vllm").removeHandler(handler)


def test_default_level_drops_benign_warnings_and_info_but_keeps_real_warnings(console):
    logger, stream = console
    configure_logging("warning")
    logger.warning("RotaryEmbedding: Failed to load weights")
    logger.info("Loading weights took 0.01 seconds")
    logger.warning("KV cache is too small for one request")
    assert stream.getvalue() == "KV cache is too small for one request\n"


def test_info_level_shows_everything(console):
    logger, stream = console
    configure_logging("info")
    logger.warning("RotaryEmbedding: Failed to load weights")
    logger.info("Loading weights took 0.01 seconds")
    assert stream.getvalue().splitlines() == [
        "RotaryEmbedding: Failed to load weights",
        "Loading weights took 0.01 seconds",
    ]


def test_actor_environment_carries_the_level():
    assert process_env("warning")["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert process_env("debug") == {LEVEL_ENV: "debug", "VLLM_LOGGING_LEVEL": "DEBUG"}
