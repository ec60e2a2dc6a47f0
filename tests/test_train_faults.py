"""A run killed anywhere resumes with no row repeated or skipped: the driver is SIGKILLed (with every process it
started) at chosen moments, re-run each time, and the finished run's rows are compared with an uninterrupted one.

`make chaos` runs more trials at random moments (CHAOS_TRIALS, CHAOS_SEED).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess

import pytest
from faults import MOMENTS, checkpoint_folders, run_until

from spo_ray.training.checkpointing import CheckpointStore, checkpoint_problem, read_state
from spo_ray.training.metrics import read_row_trace

pytestmark = pytest.mark.slow

STEPS, KEEP = 12, 2


@pytest.fixture(scope="module")
def uninterrupted_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_until(out, None, out / "runs.log")
    assert result["summary"]["steps"] == STEPS
    rows = read_row_trace(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    return rows


def assert_nothing_lost(out, reference_rows, kills):
    rows = read_row_trace(out)
    differing = [step for step in range(1, STEPS + 1) if rows.get(step) != reference_rows[step]]
    assert not differing, (
        f"after kills {kills}, steps {differing} trained other rows than the uninterrupted run "
        f"(first: step {differing[0]}: {rows.get(differing[0])} vs {reference_rows[differing[0]]})"
    )
    folders = checkpoint_folders(out)
    assert len(folders) <= KEEP, (
        f"{len(folders)} checkpoint folders remain with keep_checkpoints={KEEP}: {folders}"
    )
    assert all(checkpoint_problem(folder) is None for folder in folders)
    ray_runs = [run for run in (out / "checkpoints").iterdir() if run.is_dir()]
    assert len(ray_runs) <= len(folders), f"Ray run folders without a checkpoint were left: {ray_runs}"
    assert read_state(CheckpointStore(out / "checkpoints").latest()).step == STEPS


def run_with_kills(out, moments):
    kills = []
    for moment in moments:
        result = run_until(out, moment, out / "runs.log")
        if not result["killed"]:  # the run finished before the moment came: nothing more to interrupt
            break
        kills.append((moment, result["step"]))
    final = run_until(out, None, out / "runs.log")
    assert final["summary"]["steps"] == STEPS
    return kills, final["summary"]


def test_driver_killed_around_checkpoints_resumes_on_exactly_the_uninterrupted_rows(
    uninterrupted_rows, tmp_path
):
    # right after a checkpoint folder appears (Ray has not recorded it), between checkpoints, and once more
    moments = ["checkpoint_folder_appeared", "mid_step", "checkpoint_folder_appeared"]
    kills, summary = run_with_kills(tmp_path, moments)
    assert len(kills) == 3, kills
    # (resumed_from_step may be 0: a kill right after a folder appears often leaves no complete checkpoint)
    assert_nothing_lost(tmp_path, uninterrupted_rows, kills)


@pytest.mark.skipif(
    not os.environ.get("CHAOS_TRIALS"), reason="make chaos: CHAOS_TRIALS random kill sequences"
)
@pytest.mark.timeout(
    900 * int(os.environ.get("CHAOS_TRIALS") or 1)
)  # up to 5 runs of about a minute per trial
def test_chaos_random_kill_sequences_lose_nothing(uninterrupted_rows, tmp_path):
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
    for trial in range(int(os.environ["CHAOS_TRIALS"])):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        moments = [rng.choice(sorted(MOMENTS)) for _ in range(rng.randint(1, 4))]
        kills, _ = run_with_kills(out, moments)
        assert_nothing_lost(out, uninterrupted_rows, kills)
        print(f"trial {trial}: kills {kills}: every step's rows match the uninterrupted run", flush=True)


@contextlib.contextmanager
def small_filesystem(mount_point, size_bytes):
    """A real tmpfs of `size_bytes` at `mount_point` (needs root with CAP_SYS_ADMIN); skips the test otherwise."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): no full-disk test"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_stops_with_one_message_then_the_same_command_resumes(uninterrupted_rows, tmp_path):
    reference = (
        tmp_path.parent / "uninterrupted0"
    )  # the fixture's run: how much a run writes before its first save
    checkpoint_bytes = max(
        sum(f.stat().st_size for f in folder.iterdir()) for folder in checkpoint_folders(reference)
    )
    before_first_save = sum(
        sum(f.stat().st_size for f in (reference / name).rglob("*") if f.is_file())
        for name in ("tiny_model", "expert_reference", "task", "data")
    )
    # room for what comes before training and one and a half checkpoints: the second save runs out of space
    size = before_first_save + int(1.5 * checkpoint_bytes) + (1 << 20)
    with small_filesystem(tmp_path / "fs", size) as fs:
        out = fs / "run"
        log = tmp_path / "runs.log"
        with pytest.raises(AssertionError, match="run exited 2") as failed:
            run_until(out, None, log)
        console = log.read_text()
        message = [line for line in console.splitlines() if line.startswith("spo-ray: error:")]
        assert len(message) == 1, console[-3000:]
        store = CheckpointStore(out / "checkpoints")
        latest = store.latest()
        assert latest is not None and read_state(latest).step == 2, failed.value
        assert f"no space left on the filesystem holding {out}" in message[0]
        assert f"the last complete checkpoint is {latest} (step 2)" in message[0]
        assert console.rstrip().splitlines()[-1] == message[0], (
            "the message is not the last thing the user sees"
        )

        # free the space the run needs (the test's filesystem grows: the user deleted something), same command
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(fs)], check=True)
        final = run_until(out, None, log)
        assert final["summary"]["resumed_from_step"] == 2 and final["summary"]["steps"] == STEPS
        assert_nothing_lost(out, uninterrupted_rows, kills=["disk full at the step-4 save"])
