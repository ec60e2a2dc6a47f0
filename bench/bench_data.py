"""Data pipeline benchmark: rows/s tokenized and peak driver memory, at a small and a large row count.

Run: `.venv/bin/python bench/bench_data.py [--rows 100000 --small 10000 --out bench/out/data.json]`.
Each size runs in a fresh process (`ray.init(num_cpus=2)`), so its peak RSS (ru_maxrss) is its own;
`prepare` runs twice (cold: Ray workers start and load the tokenizer; warm: the same work again).
Rows are generated into --work-dir (never committed): explicit, conversational and HH-transcript
pairs. Measured: `prepare_preference_data` (read, normalize, template, tokenize, write), and reading
one epoch through `train_shards` (2 ranks: permute, sort) + `collate_preference_batch`. The driver's
peak RSS should not grow with the row count (streaming); Ray workers' memory is not the driver's.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000, help="the smaller size to compare peak RSS with")
    parser.add_argument("--tokenizer", help="model folder (default: the tiny model, built into --work-dir)")
    parser.add_argument("--work-dir", default="", help="where rows and outputs go (default: a temp dir)")
    parser.add_argument("--out", default="bench/out/data.json")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run_one(args.child, work_dir, args.tokenizer)))
        return
    tokenizer = args.tokenizer
    if not tokenizer:
        from spo_ray.models.tiny import build_tiny_model

        tokenizer = str(build_tiny_model(work_dir / "tiny", seed=0))
    results = []
    for rows in (args.small, args.rows):
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
    small, large = results
    report = {
        "results": results,
        "peak_rss_growth_mb": round(large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"], 1),
        "prepare_peak_rss_growth_mb": round(
            large["driver_peak_rss_mb_after_prepare"] - small["driver_peak_rss_mb_after_prepare"], 1
        ),
        "tokenizer": tokenizer,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))


if __name__ == "__main__":
    main()
