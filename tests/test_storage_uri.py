"""output.dir as a filesystem URI: a run on file:// and on s3:// (a real S3 server, moto, on loopback) writes its
checkpoints, metrics, config, summary and final/ there, and a re-run resumes from the bucket's checkpoint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from spo_ray.config import load_config
from spo_ray.errors import ConfigError

pytestmark = pytest.mark.slow

BUCKET = "spo-runs"


def pair(i: int) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port, its bucket, and AWS_* set for this process.

    Ray workers get the endpoint inside the pickled filesystem and their keys from their own environment: the
    dummy ones conftest.py sets before the session's Ray runtime starts (a cluster's nodes hold their own)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from spo_ray import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    storage._filesystem.cache_clear()  # a filesystem opened before would not know the endpoint
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._filesystem.cache_clear()
    server.stop()


def bucket_files(client, prefix: str) -> dict[str, int]:
    """key -> size of every object under `prefix`, read with boto3 (not the code under test)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


def bucket_text(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def run_config(tmp_path, tiny_model_dir, output_dir, *extra):
    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(48)))
    return load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.train_files=[{data}]",
            "loss.kl_coef=0",
            "train.batch_size=4",
            "train.warmup_steps=0",
            "train.keep_checkpoints=2",
            "logging.progress=false",
            "logging.wandb_mode=disabled",
            f"output.dir={output_dir}",
            *extra,
        ],
    )


def test_an_unsupported_scheme_or_an_unwritable_bucket_is_a_config_error_naming_output_dir(
    s3_server, tmp_path
):
    from spo_ray.storage import output_location

    with pytest.raises(ConfigError) as bad_scheme:
        load_config(None, ["output.dir=ftp://host/run"])
    assert bad_scheme.value.key == "output.dir" and "ftp://" in str(bad_scheme.value)
    with pytest.raises(ConfigError) as no_bucket:
        output_location("s3://no-such-bucket/run")
    assert no_bucket.value.key == "output.dir" and "no-such-bucket" in str(no_bucket.value)
    assert "credentials" in str(no_bucket.value)
    assert output_location(f"file://{tmp_path}/a%20run") == tmp_path / "a run"


def test_a_file_uri_run_then_an_s3_run_that_resumes_from_its_checkpoint_in_the_bucket(
    s3_server, ray_runtime, tiny_model_dir, tmp_path
):
    """One run per location keeps this short: the file:// run's folder is copied into the bucket (a run moved
    to shared storage), and the s3:// run resumes from that checkpoint, checkpoints and exports there."""
    import pyarrow.fs

    from spo_ray.training.checkpointing import CheckpointStore, checkpoint_problem, read_state
    from spo_ray.training.metrics import read_metrics
    from spo_ray.training.runner import run_training

    out = tmp_path / "file run"
    local = run_training(
        run_config(tmp_path, tiny_model_dir, "file://" + str(out).replace(" ", "%20"), "train.max_steps=2")
    )
    assert local["steps"] == 2 and local["final_model"] == str(out / "final")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert (out / "final" / "model.safetensors").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not Path("file:").exists()  # the URI was not taken for a relative folder name

    bucket = pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    pyarrow.fs.copy_files(
        str(out / "checkpoints"),
        f"{BUCKET}/runs/moved/checkpoints",
        source_filesystem=pyarrow.fs.LocalFileSystem(),
        destination_filesystem=bucket,
    )
    # what a crash after step 3 was logged, before its checkpoint, leaves: a metrics line past the checkpoint
    lines = (out / "metrics.jsonl").read_text() + json.dumps({"step": 3, "loss": -1.0}) + "\n"
    s3_server.put_object(Bucket=BUCKET, Key="runs/moved/metrics.jsonl", Body=lines.encode())

    uri = f"s3://{BUCKET}/runs/moved"
    moved = run_training(
        run_config(tmp_path, tiny_model_dir, uri, "train.max_steps=4", "train.checkpoint_every=1")
    )
    assert moved["resumed_from_step"] == 2 and moved["steps"] == 4 and moved["final_model"] == f"{uri}/final"

    files = bucket_files(s3_server, "runs/moved/")
    metrics = [json.loads(line) for line in bucket_text(s3_server, "runs/moved/metrics.jsonl").splitlines()]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]  # the torn run's step 3 dropped, then logged anew
    assert metrics[2]["loss"] != -1.0
    assert [row["data_consumed"] for row in metrics] == [4, 8, 12, 16]  # no example repeated or skipped
    assert json.loads(bucket_text(s3_server, "runs/moved/summary.json"))["steps"] == 4
    assert json.loads(bucket_text(s3_server, "runs/moved/config.json"))["output"]["dir"] == uri
    assert files["runs/moved/final/model.safetensors"] > 0 and "runs/moved/final/config.json" in files
    store = CheckpointStore(
        uri + "/checkpoints"
    )  # Ray Train's uploads; train.keep_checkpoints=2 pruned there
    assert [step for step, _ in store.complete()] == [3, 4] and len(store.folders()) == 2
    assert all(checkpoint_problem(folder) is None for folder in store.folders())  # SHA-256 of bucket objects
    assert read_state(store.latest()).step == 4


def test_a_torn_checkpoint_in_the_bucket_is_refused_and_pruned_there(s3_server, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from spo_ray.config import TrainConfig
    from spo_ray.storage import upload_dir
    from spo_ray.training.checkpointing import CheckpointStore, TrainState, save_checkpoint
    from spo_ray.training.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer, scheduler = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=0))
    store = CheckpointStore(f"s3://{BUCKET}/runs/torn/checkpoints")
    for name, step in [("checkpoint_a", 4), ("checkpoint_b", 6)]:
        save_checkpoint(
            tmp_path / name,
            rank=0,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=TrainState(step),
        )
        upload_dir(tmp_path / name, store.root / "ray_run" / name)
    assert [step for step, _ in store.complete()] == [4, 6]
    key = "runs/torn/checkpoints/ray_run/checkpoint_b/model.safetensors"  # an upload cut off: half the bytes
    whole = s3_server.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3_server.put_object(Bucket=BUCKET, Key=key, Body=whole[: len(whole) // 2])
    assert store.latest() == store.root / "ray_run" / "checkpoint_a"
    said = []
    assert store.prune(keep=2, log=said.append) == [(4, store.root / "ray_run" / "checkpoint_a")]
    assert len(said) == 1 and "checkpoint_b (incomplete: model.safetensors has" in said[0]
    assert not any("checkpoint_b" in key for key in bucket_files(s3_server, "runs/torn/"))
