"""Data pipeline benchmark: rows/s tokenized and peak driver memory, at a small and a large row count.

Run: `.venv/bin/python bench/bench_data.py [--rows 100000 --small 10000 --out bench/out/data.json]`.
Each size runs in a fresh process (`ray.init(num_cpus=2)`), so its peak RSS (ru_maxrss) is its own;
`prepare` runs twice (cold: Ray workers start and load the tokenizer; warm: the same work again).
Rows are generated into --work-dir (never committed): explicit, conversational and HH-transcript
pairs. Measured: `prepare_preference_data` (read, normalize, template, tokenize, write), and reading
one epoch through `train_shards` (2 ranks: permute, sort) + `collate_preference_batch`. The driver's
peak RSS should not grow with the row count (streaming); Ray workers' memory is not the driver's.

`--scale --before DIR` compares this checkout with an older one (DIR: e.g. `git archive afe9b6b`) on one
file of `--rows` rows, each in a fresh process with that code first on the path, and merges
`data_read_amplification` and `resume_seconds_ratio` into bench/results.json:
- rows read per rank / rows in its shard, one epoch on 2 ranks (counted in the read path: rows the
  part files hand to the rank's pipeline);
- seconds from `train_shards` (2 ranks, 2 epochs, as a short run asks) to each rank's first batch;
- resume: `run_training` on a finished run's output dir, the same command again (offline SPO, tiny model).

`--vs-trl` adds the comparison with TRL's DPOTrainer preprocessing on --vs-trl-rows conversational rows
(bench/data_vs_trl.py says what each side runs), `--large N` both sides once more at N rows (time and peak memory); the report
goes into --out under "vs_trl".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_vs_trl import child_run, compare  # noqa: E402

WORDS = [
    "the",
    "a",
    "model",
    "river",
    "plan",
    "answer",
    "story",
    "code",
    "bread",
    "sky",
    "apple",
    "robot",
    "friend",
    "reason",
    "step",
    "poem",
]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."


def text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(low, high)))


def generate_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Write `rows` preference pairs as JSONL, one at a time (nothing held in memory)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            prompt, chosen, rejected = text(rng, 1, 4), text(rng, 1, 3), text(rng, 1, 3) + f" ({i})"
            kind = i % 10
            if kind < 7:
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            elif kind < 9:
                row = {
                    "prompt": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": prompt},
                    ],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            else:
                shared = f"\n\nHuman: {prompt}\n\nAssistant:"
                row = {"chosen": f"{shared} {chosen}", "rejected": f"{shared} {rejected}"}
            fh.write(json.dumps(row) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(rows: int, work_dir: Path, tokenizer_dir: str) -> dict:
    """One size, in this process: generate, prepare, read an epoch on 2 ranks; timings and peak RSS."""
    import ray
    from ray.data import DataContext

    from spo_ray.config import DataConfig
    from spo_ray.data import collate_preference_batch, prepare_preference_data, train_shards

    data = work_dir / f"pairs-{rows}.jsonl"
    generate_rows(data, rows)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    rss_after_start = peak_rss_mb()
    cfg = DataConfig(train_files=[str(data)], max_length=256, max_prompt_length=192)

    started = time.perf_counter()
    prepared = prepare_preference_data(cfg, tokenizer_dir, str(work_dir / f"out-{rows}"))
    prepare_s = time.perf_counter() - started  # includes starting Ray workers and loading the tokenizer
    started = time.perf_counter()
    prepared = prepare_preference_data(cfg, tokenizer_dir, str(work_dir / f"out-{rows}"))
    warm_s = time.perf_counter() - started  # the same work on warm workers
    rss_after_prepare = peak_rss_mb()

    started = time.perf_counter()
    shards = train_shards(prepared, world_size=2, seed=0, epoch=0)
    read, tokens = 0, 0
    for shard in shards.values():
        for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
            collated = collate_preference_batch(batch, prepared.pad_token_id)
            read += len(batch["example_id"])
            tokens += int(collated.attention_mask.sum())
    read_s = time.perf_counter() - started
    ray.shutdown()
    return {
        "rows": rows,
        "num_train": prepared.num_train,
        "bad_rows": prepared.bad_rows,
        "prepare_seconds": round(prepare_s, 2),
        "tokenized_rows_per_s": round(rows / prepare_s, 1),
        "prepare_warm_seconds": round(warm_s, 2),
        "tokenized_rows_per_s_warm": round(rows / warm_s, 1),
        "epoch_read_seconds": round(read_s, 2),
        "epoch_rows_per_s": round(read / read_s, 1),
        "epoch_tokens": tokens,
        "driver_peak_rss_mb_after_ray_start": round(rss_after_start, 1),
        "driver_peak_rss_mb_after_prepare": round(rss_after_prepare, 1),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _count_rows(batch, path: str):
    """Pass-through that records how many rows went by (appends to `path`: one line per block)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{batch.num_rows}\n")
    return batch


def _counted(path: Path) -> int:
    return sum(int(line) for line in path.read_text().split()) if path.exists() else 0


def _counting_prepared(prepared, path: Path):
    """The same data, with a counter on the path every rank's rows are read through."""
    import dataclasses

    if not hasattr(prepared, "train_rows"):  # before: each rank maps prepared.train (all rows)
        counted = prepared.train.map_batches(
            _count_rows, batch_format="pyarrow", fn_kwargs={"path": str(path)}
        )
        return dataclasses.replace(prepared, train=counted)
    from spo_ray.data.store import RowIndex

    class CountingRowIndex(RowIndex):  # after: ranks take their rows through RowIndex.read
        def read(self, ids):
            table = super().read(ids)
            _count_rows(table, str(path))
            return table

    rows = CountingRowIndex(
        **{f.name: getattr(prepared.train_rows, f.name) for f in dataclasses.fields(RowIndex)}
    )
    return dataclasses.replace(prepared, train_rows=rows)


def run_scale(rows: int, work_dir: Path, tokenizer_dir: str, label: str) -> dict:
    """Read amplification and time to each rank's first batch, with the code on sys.path (before or after)."""
    import threading

    import ray
    from ray.data import DataContext

    from spo_ray.config import DataConfig
    from spo_ray.data import prepare_preference_data, shard_plan, train_shards

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    data = work_dir / f"pairs-{rows}.jsonl"
    cfg = DataConfig(train_files=[str(data)], max_length=256, max_prompt_length=192)
    started = time.perf_counter()
    prepared = prepare_preference_data(cfg, tokenizer_dir, str(work_dir / f"scale-{label}"))
    prepare_s = time.perf_counter() - started
    world, result = (
        2,
        {"label": label, "rows": rows, "num_train": prepared.num_train, "prepare_seconds": prepare_s},
    )

    # time to each rank's first batch: both ranks iterate at once, as two Ray Train workers do
    first_batch = {}
    started = time.perf_counter()
    shards = train_shards(prepared, world_size=world, seed=0, epoch=0, num_epochs=2)

    def first(rank: int) -> None:
        next(iter(shards[f"train_rank{rank}"].iter_batches(batch_size=8, batch_format="numpy")))
        first_batch[rank] = round(time.perf_counter() - started, 2)

    threads = [threading.Thread(target=first, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result["first_batch_seconds_per_rank"] = [first_batch[r] for r in range(world)]

    # read amplification: one epoch per rank, rows counted where they leave the part files
    plan = shard_plan(prepared.num_train, world)
    result["rows_in_shard"] = plan.per_rank
    result["rows_read_per_rank"], result["rows_yielded_per_rank"], result["epoch_read_seconds_per_rank"] = (
        [],
        [],
        [],
    )
    for rank in range(world):
        counter = work_dir / f"count-{label}-{rank}.txt"
        counter.unlink(missing_ok=True)
        counting = _counting_prepared(prepared, counter)
        started = time.perf_counter()
        shard = train_shards(counting, world_size=world, seed=0, epoch=0)[f"train_rank{rank}"]
        yielded = sum(len(b["example_id"]) for b in shard.iter_batches(batch_size=64, batch_format="numpy"))
        result["epoch_read_seconds_per_rank"].append(round(time.perf_counter() - started, 2))
        result["rows_yielded_per_rank"].append(yielded)
        result["rows_read_per_rank"].append(_counted(counter))
    result["read_amplification_per_rank"] = [r / plan.per_rank for r in result["rows_read_per_rank"]]
    ray.shutdown()
    return result


def run_resume(rows: int, work_dir: Path, tokenizer_dir: str, label: str, timed: bool) -> dict:
    """One `run_training` call on a fixed output dir (the first call trains 2 steps, the second resumes)."""
    from spo_ray.config import load_config
    from spo_ray.training.runner import run_training

    overrides = [
        f"model.path={tokenizer_dir}",
        f"data.train_files=[{work_dir / f'pairs-{rows}.jsonl'}]",
        "data.max_length=256",
        "data.max_prompt_length=192",
        "loss.name=spo",
        "loss.kl_coef=0",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.checkpoint_every=0",
        "logging.progress=false",
        f"output.dir={work_dir / f'resume-{label}'}",
    ]
    cfg = load_config(None, overrides)
    started = time.perf_counter()
    summary = run_training(cfg)
    return {
        "label": label,
        "seconds": round(time.perf_counter() - started, 2),
        "steps": summary["steps"],
        "resumed_from_step": summary["resumed_from_step"],
        "timed": timed,
    }


def scale(args: argparse.Namespace, work_dir: Path, tokenizer: str) -> None:
    """Before vs after on one file: children with each code first on PYTHONPATH; merge into results.json."""
    data = work_dir / f"pairs-{args.rows}.jsonl"
    if not data.exists():
        generate_rows(data, args.rows)
    report = {
        "rows": args.rows,
        "tokenizer": tokenizer,
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    earlier = json.loads(Path(args.out).read_text()) if args.keep_before and Path(args.out).exists() else {}
    for label, code in (("before", args.before), ("after", str(Path(__file__).resolve().parents[1]))):
        if label == "before" and earlier.get("rows") == args.rows and "before" in earlier:
            report[label] = earlier["before"]  # --keep-before: the older code's figures from the last run
            continue
        env = {**os.environ, "PYTHONPATH": code}
        child = [
            sys.executable,
            __file__,
            "--work-dir",
            str(work_dir),
            "--tokenizer",
            tokenizer,
            "--rows",
            str(args.rows),
        ]
        runs = {}
        for mode in ("scale", "resume-first", "resume-again"):
            done = subprocess.run(
                [*child, "--child-mode", mode, "--label", label],
                check=True,
                capture_output=True,
                text=True,
                env=env,
                cwd=work_dir,
            )
            runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(label, json.dumps(runs[mode]), flush=True)
        report[label] = runs
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")  # so far (see --keep-before)
    before, after = report["before"], report["after"]
    report["data_read_amplification"] = max(after["scale"]["read_amplification_per_rank"])
    report["data_read_amplification_before"] = max(before["scale"]["read_amplification_per_rank"])
    report["first_batch_seconds"] = {
        "before": max(before["scale"]["first_batch_seconds_per_rank"]),
        "after": max(after["scale"]["first_batch_seconds_per_rank"]),
    }
    report["resume_seconds"] = {
        "before": before["resume-again"]["seconds"],
        "after": after["resume-again"]["seconds"],
    }
    report["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["resume_seconds_ratio"] = round(
        report["resume_seconds"]["before"] / report["resume_seconds"]["after"], 2
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    results_path = Path(__file__).resolve().parent / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["data_read_amplification"] = report["data_read_amplification"]
    results["resume_seconds_ratio"] = report["resume_seconds_ratio"]
    results["data_scale"] = {
        "rows": args.rows,
        "read_amplification_before": report["data_read_amplification_before"],
        "first_batch_seconds": report["first_batch_seconds"],
        "resume_seconds": report["resume_seconds"],
        "note": "2 ranks; amplification over one epoch; first batch of 2 epochs (both ranks at once); "
        "resume = the same run_training call on a finished run (offline SPO, tiny model, 1 worker)",
    }
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("before", "after")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000, help="the smaller size to compare peak RSS with")
    parser.add_argument("--tokenizer", help="model folder (default: the tiny model, built into --work-dir)")
    parser.add_argument("--work-dir", default="", help="where rows and outputs go (default: a temp dir)")
    parser.add_argument("--out", default="bench/out/data.json")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--scale", action="store_true", help="before vs after: read amplification, first batch, resume"
    )
    parser.add_argument("--before", default="", help="--scale: a checkout of the code to compare with")
    parser.add_argument("--keep-before", action="store_true", help="--scale: reuse --out's 'before' figures")
    parser.add_argument("--child-mode", default="", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--vs-trl", action="store_true", help="also compare with TRL (data_vs_trl.py)")
    parser.add_argument("--vs-trl-rows", type=int, default=50_000, help="--vs-trl: rows both sides tokenize")
    parser.add_argument("--rounds", type=int, default=2, help="--vs-trl: interleaved rounds (median)")
    parser.add_argument(
        "--large", type=int, default=0, help="--vs-trl: both sides once more at this many rows"
    )
    parser.add_argument("--cpus", type=int, default=2, help="--vs-trl: Ray CPUs = TRL's dataset_num_proc")
    parser.add_argument("--reps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--only-vs-trl", action="store_true", help="--vs-trl alone, without the sizes above")
    args = parser.parse_args()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run_one(args.child, work_dir, args.tokenizer)))
        return
    if args.child_mode == "scale":
        print(json.dumps(run_scale(args.rows, work_dir, args.tokenizer, args.label)))
        return
    if args.child_mode.startswith("vs-"):
        print(
            json.dumps(child_run(args.child_mode, args.rows, work_dir, args.tokenizer, args.reps, args.cpus))
        )
        return
    if args.child_mode.startswith("resume"):
        print(
            json.dumps(
                run_resume(args.rows, work_dir, args.tokenizer, args.label, args.child_mode == "resume-again")
            )
        )
        return
    tokenizer = args.tokenizer
    if not tokenizer:
        from spo_ray.models.tiny import build_tiny_model

        tokenizer = str(build_tiny_model(work_dir / "tiny", seed=0))
    if args.scale:
        if not args.before:
            parser.error("--scale needs --before DIR (a checkout of the code to compare with)")
        scale(args, work_dir, tokenizer)
        return
    results = []
    for rows in () if args.only_vs_trl else (args.small, args.rows):
        command = [
            sys.executable,
            __file__,
            "--child",
            str(rows),
            "--tokenizer",
            tokenizer,
            "--work-dir",
            str(work_dir),
        ]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    report = {"results": results, "tokenizer": tokenizer}
    if results:
        small, large = results
        report["peak_rss_growth_mb"] = round(large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"], 1)
        report["prepare_peak_rss_growth_mb"] = round(
            large["driver_peak_rss_mb_after_prepare"] - small["driver_peak_rss_mb_after_prepare"], 1
        )
    if args.vs_trl:
        bench = Path(__file__).resolve()
        report["vs_trl"] = compare(
            bench, work_dir, tokenizer, args.vs_trl_rows, args.rounds, args.cpus, args.large
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("results", "vs_trl")}))
    if "vs_trl" in report:
        print(
            json.dumps({k: v for k, v in report["vs_trl"].items() if k not in ("runs", "large", "large_trl")})
        )


if __name__ == "__main__":
    main()
