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
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
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


def test_a_louder_level_drops_the_quiet_vllm_config_an_earlier_call_left_for_child_processes(
    console, monkeypatch
):
    """A default (quiet) run in this process points VLLM_LOGGING_CONFIG_PATH at a WARNING-level config; a later
    `--verbose` run, here or in a child that inherits the environment, must not start its engines with it (in a
    full suite the verbose CLI test's engines printed no INFO line because of it). A user's own config stays."""
    import os

    import vllm.logger  # noqa: F401 (the quiet config is written only once vLLM's logger exists)

    configure_logging("warning")
    quiet_config = os.environ["VLLM_LOGGING_CONFIG_PATH"]
    assert os.path.basename(quiet_config).startswith("spo_ray_vllm_logging_")
    configure_logging("info")
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/etc/my_vllm_logging.json")
    configure_logging("info")
    assert os.environ["VLLM_LOGGING_CONFIG_PATH"] == "/etc/my_vllm_logging.json"
