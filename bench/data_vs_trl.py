"""Data plane vs TRL (bench_data.py --vs-trl): tokenizing the same conversational rows, and reading an epoch.

Ours: `prepare_preference_data` on a fresh Ray runtime (`ray.init(num_cpus=CPUS)`), what `run_training`
does before step 1; then one epoch through `train_shards` (1 rank) + `collate_preference_batch`.
TRL: `datasets.load_dataset("json")` then `DPOTrainer._prepare_dataset` (the method its `__init__` calls:
`extract_prompt` if needed, `tokenize_fn` per row via `datasets.map(num_proc=args.dataset_num_proc)`, the
`max_length` filter), `dataset_num_proc=CPUS`; then one epoch through a `DataLoader` (shuffled, batch 64,
`num_workers=0` as `TrainingArguments` defaults) with `DataCollatorForPreference`.
Each side runs in a fresh process; a sampler thread reads the RSS of the driver and of every process under
it (Ray: raylet, GCS and the worker processes that run the tasks; TRL: the `datasets.map` pool).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

TOPICS = ["river", "bread", "robot", "garden", "planet", "violin", "harbor", "ledger", "lantern", "compiler"]
_TEXT = (
    "the a an of to in for with on at by from about model plan answer story code sky apple friend reason "
    "step poem light water stone window market winter summer quietly carefully because however therefore "
    "explain describe compare write list suggest improve simple detailed short long small large early late "
    "people city road house music number table letter history science method result question problem"
)
WORDS = _TEXT.split(" ")


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(low, high)))


def generate_conversations(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` conversational pairs as JSONL (TRL's explicit-prompt format): a prompt of 1-2 user turns (with a
    system turn in a third of them, earlier assistant turns between), one assistant turn chosen / rejected;
    with the tiny tokenizer about 60-200 tokens prompt + response."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            prompt = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
            for turn in range(rng.choice((1, 1, 2))):
                if turn:
                    prompt.append({"role": "assistant", "content": _text(rng, 1, 1)})
                prompt.append(
                    {"role": "user", "content": f"About the {rng.choice(TOPICS)}: {_text(rng, 1, 2)}"}
                )
            row = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": _text(rng, 1, 2)}],
                "rejected": [{"role": "assistant", "content": _text(rng, 1, 2) + f" ({i})"}],
            }
            fh.write(json.dumps(row) + "\n")


class TreeMemory:
    """Peak RSS of this process and of the processes under it, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = {"driver_mb": 0.0, "worker_max_mb": 0.0, "workers_sum_mb": 0.0, "others_sum_mb": 0.0}
        self.workers_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _is_worker(proc) -> bool:
        """A process that runs tasks: a Ray worker (`ray::IDLE`, `ray::<task>`, default_worker.py) or, without
        Ray, any child (the `datasets.map` pool); not Ray's own services (GCS, raylet, agents, monitors)."""
        try:
            cmdline = " ".join(proc.cmdline())
        except Exception:
            return False
        if cmdline.startswith("ray::"):
            return not cmdline.split()[0].endswith("Agent")
        return "default_worker.py" in cmdline or "/ray/" not in cmdline

    def sample(self) -> None:
        """One reading of every process in the tree, folded into the peaks."""
        mb = 1 << 20
        workers, others = [], []
        for proc in self.me.children(recursive=True):
            try:
                rss = proc.memory_info().rss / mb
            except Exception:
                continue
            if self._is_worker(proc):
                workers.append(rss)
                self.workers_seen.add(proc.pid)
            else:
                others.append(rss)
        driver = self.me.memory_info().rss / mb
        for key, value in (
            ("driver_mb", driver),
            ("worker_max_mb", max(workers, default=0.0)),
            ("workers_sum_mb", sum(workers)),
            ("others_sum_mb", sum(others)),
        ):
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict:
        """Peaks in MB, rounded, with the number of worker processes seen."""
        return {**{k: round(v, 1) for k, v in self.peak.items()}, "worker_processes": len(self.workers_seen)}


def run_ours(data: Path, work_dir: Path, tokenizer_dir: str, cpus: int, reps: int, read: bool) -> dict:
    """Our preparation on a fresh Ray runtime (`reps` times, each into a fresh output: no cache hit), then
    one epoch read on 1 rank into collated batches."""
    import ray
    from ray.data import DataContext

    from spo_ray.config import DataConfig
    from spo_ray.data import collate_preference_batch, prepare_preference_data, train_shards

    cfg = DataConfig(train_files=[str(data)], max_length=256, max_prompt_length=240)
    out: dict = {"side": "ours", "cpus": cpus}
    with TreeMemory() as memory:
        started = time.perf_counter()
        for attempt in range(6):  # a loaded machine can miss Ray's fixed 30 s node start-up wait
            try:
                ray.init(
                    address="local",
                    num_cpus=cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
                break
            except Exception:
                if attempt == 5:
                    raise
                ray.shutdown()
        DataContext.get_current().enable_progress_bars = False
        out["ray_init_seconds"] = round(time.perf_counter() - started, 2)
        seconds = []
        for rep in range(reps):
            output = work_dir / f"ours-{data.stem}-{rep}"
            shutil.rmtree(output, ignore_errors=True)  # an earlier run's cache would be reused
            started = time.perf_counter()
            prepared = prepare_preference_data(cfg, tokenizer_dir, str(output))
            seconds.append(round(time.perf_counter() - started, 2))
        out.update(prepare_seconds=seconds, rows=prepared.rows_read, num_train=prepared.num_train)
        out["prepare_memory"] = memory.report()
        if read:
            started = time.perf_counter()
            shard = train_shards(prepared, world_size=1, seed=0, epoch=0)["train_rank0"]
            rows = tokens = 0
            for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
                collated = collate_preference_batch(batch, prepared.pad_token_id)
                rows += len(batch["example_id"])
                tokens += int(collated.attention_mask.sum())
            out.update(
                epoch_seconds=round(time.perf_counter() - started, 2), epoch_rows=rows, epoch_tokens=tokens
            )
        ray.shutdown()
    out["memory"] = memory.report()
    return out


class _TrainerStub:
    """What `DPOTrainer._prepare_dataset` reads from `self` (only `_tokenizer`, for non-conversational rows)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer


def run_trl(data: Path, work_dir: Path, tokenizer_dir: str, cpus: int, reps: int, read: bool) -> dict:
    """TRL's own preprocessing of the same file (load_dataset + DPOTrainer._prepare_dataset with
    dataset_num_proc=cpus, caching off), then one epoch through its DataLoader + DataCollatorForPreference."""
    os.environ["HF_DATASETS_CACHE"] = str(work_dir / "hf-datasets")
    import datasets
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:  # as DPOTrainer.__init__ does
        tokenizer.pad_token = tokenizer.eos_token
    args = DPOConfig(
        output_dir=str(work_dir / "trl-out"),
        dataset_num_proc=cpus,
        max_length=256,
        report_to=[],
        use_cpu=True,
    )
    out: dict = {"side": "trl", "cpus": cpus, "dataset_num_proc": cpus}
    with TreeMemory() as memory:
        load_s, prep_s = [], []
        for _ in range(reps):
            started = time.perf_counter()
            dataset = datasets.load_dataset("json", data_files=str(data), split="train")
            load_s.append(round(time.perf_counter() - started, 2))
            started = time.perf_counter()
            tokenized = DPOTrainer._prepare_dataset(
                _TrainerStub(tokenizer), dataset, tokenizer, args, "train"
            )
            prep_s.append(round(time.perf_counter() - started, 2))
        out.update(load_seconds=load_s, prepare_seconds=prep_s, rows=len(dataset), num_train=len(tokenized))
        out["prepare_memory"] = memory.report()
        if read:
            collator = DataCollatorForPreference(
                pad_token_id=tokenizer.pad_token_id, max_length=args.max_length
            )
            columns = tokenized.select_columns(
                ["prompt_ids", "chosen_ids", "rejected_ids"]
            )  # as Trainer keeps
            loader = DataLoader(columns, batch_size=64, shuffle=True, collate_fn=collator, num_workers=0)
            started = time.perf_counter()
            rows = tokens = 0
            for batch in loader:
                rows += batch["input_ids"].shape[0] // 2
                tokens += int(batch["attention_mask"].sum())
            out.update(
                epoch_seconds=round(time.perf_counter() - started, 2), epoch_rows=rows, epoch_tokens=tokens
            )
    out["memory"] = memory.report()
    return out


def _child(bench: Path, work_dir: Path, tokenizer: str, mode: str, rows: int, reps: int, cpus: int) -> dict:
    """One side at one size in a fresh process (bench_data.py --child-mode ...); its JSON line."""
    import subprocess
    import sys

    command = [sys.executable, str(bench), "--work-dir", str(work_dir), "--tokenizer", tokenizer]
    command += ["--child-mode", mode, "--rows", str(rows), "--reps", str(reps), "--cpus", str(cpus)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=work_dir)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_run(mode: str, rows: int, work_dir: Path, tokenizer: str, reps: int, cpus: int) -> dict:
    """The body of a child process: generate the rows once (shared by both sides), run one side."""
    data = work_dir / f"conversations-{rows}.jsonl"
    if not data.exists():
        generate_conversations(data, rows)
    run = run_ours if mode == "vs-ours" else run_trl
    return run(data, work_dir, tokenizer, cpus, reps, read=True)


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def compare(
    bench: Path, work_dir: Path, tokenizer: str, rows: int, rounds: int, cpus: int, large: int
) -> dict:
    """`rounds` interleaved pairs of children (ours, TRL) at `rows`; with `large`, both sides once more at that
    size (one first run each: time and memory). Ratios: our rows/s ÷ TRL's, from the medians over rounds."""
    sides: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(rounds):
        for side in ("ours", "trl"):
            sides[side].append(_child(bench, work_dir, tokenizer, f"vs-{side}", rows, 2, cpus))
            print(json.dumps(sides[side][-1]), flush=True)
    ours_cold = _median([r["prepare_seconds"][0] for r in sides["ours"]])
    ours_warm = _median([r["prepare_seconds"][1] for r in sides["ours"]])
    trl_tokenize = _median([min(r["prepare_seconds"]) for r in sides["trl"]])
    trl_with_load = _median(
        [min(a + b for a, b in zip(r["load_seconds"], r["prepare_seconds"])) for r in sides["trl"]]
    )
    ours_epoch = _median([r["epoch_seconds"] for r in sides["ours"]])
    trl_epoch = _median([r["epoch_seconds"] for r in sides["trl"]])
    report = {
        "rows": rows,
        "cpus": cpus,
        "rounds": rounds,
        "runs": sides,
        "ours_prepare_seconds": {"first_in_fresh_runtime": ours_cold, "again_fresh_output": ours_warm},
        "trl_seconds": {"prepare_dataset": trl_tokenize, "load_dataset_plus_prepare_dataset": trl_with_load},
        "ours_rows_per_s": round(rows / ours_cold, 1),
        "trl_rows_per_s": round(rows / trl_tokenize, 1),
        "data_rows_per_s_ratio_vs_trl": round(trl_tokenize / ours_cold, 2),
        "data_rows_per_s_ratio_vs_trl_warm": round(trl_tokenize / ours_warm, 2),
        "data_rows_per_s_ratio_vs_trl_with_load": round(trl_with_load / ours_cold, 2),
        "epoch_rows_per_s": {"ours": round(rows / ours_epoch, 1), "trl": round(rows / trl_epoch, 1)},
        "epoch_rows_per_s_ratio_vs_trl": round(trl_epoch / ours_epoch, 2),
        "memory_mb": {"ours": {rows: sides["ours"][0]["memory"]}, "trl": {rows: sides["trl"][0]["memory"]}},
        "note": "ours: prepare_preference_data, first in a fresh ray.init(num_cpus=cpus) (ray.init itself not "
        "counted; its workers' imports and the driver's tokenizer load are), max_length 256; TRL: "
        "DPOTrainer._prepare_dataset with dataset_num_proc=cpus (the faster of 2 runs in one process, load_dataset "
        "not counted), max_length 256; epoch: ours train_shards (1 rank) + collate_preference_batch, TRL DataLoader "
        "(shuffle, num_workers=0) + DataCollatorForPreference, batch 64",
    }
    if large:
        big = _child(bench, work_dir, tokenizer, "vs-ours", large, 1, cpus)
        print(json.dumps(big), flush=True)
        big_trl = _child(bench, work_dir, tokenizer, "vs-trl", large, 1, cpus)
        print(json.dumps(big_trl), flush=True)
        report["large"], report["large_trl"] = big, big_trl
        report["memory_mb"]["ours"][large] = big["memory"]
        report["memory_mb"]["trl"][large] = big_trl["memory"]
        report["data_rows_per_s_ratio_vs_trl_large"] = round(
            big_trl["prepare_seconds"][0] / big["prepare_seconds"][0], 2
        )
        report["epoch_rows_per_s_ratio_vs_trl_large"] = round(
            big_trl["epoch_seconds"] / big["epoch_seconds"], 2
        )
    return report


def keep_large(report: dict, previous: dict) -> dict:
    """The report plus the memory figures of sizes it did not run (--large) from a previous results.json."""
    kept = ((previous.get("data_vs_trl") or {}).get("memory_mb") or {}).get("ours") or {}
    ours = report["memory_mb"]["ours"]
    for rows, memory in kept.items():
        if str(rows) not in {str(r) for r in ours}:
            ours[rows] = {**memory, "kept_from_an_earlier_run": True}
    return report


def results_keys(report: dict) -> dict:
    """The results.json keys of a comparison report."""
    keys = (
        "data_rows_per_s_ratio_vs_trl",
        "data_rows_per_s_ratio_vs_trl_warm",
        "epoch_rows_per_s_ratio_vs_trl",
    )
    out = {key: report.get(key) for key in keys}
    if report.get("large"):  # --large N: both sides once more at N rows, first runs
        out[f"data_rows_per_s_ratio_vs_trl_{report['large']['rows'] // 1000}k"] = report[
            "data_rows_per_s_ratio_vs_trl_large"
        ]
    out["data_vs_trl"] = {
        key: report.get(key)
        for key in (
            "rows",
            "cpus",
            "ours_prepare_seconds",
            "trl_seconds",
            "ours_rows_per_s",
            "trl_rows_per_s",
            "epoch_rows_per_s",
            "memory_mb",
            "note",
        )
    }
    return out


def markdown(report: dict) -> list[str]:
    """The RESULTS.md lines for a comparison report."""
    if not report:
        return []
    ours, trl = report["ours_prepare_seconds"], report["trl_seconds"]
    lines = [
        f"### Against TRL's DPOTrainer preprocessing ({report['rows']} conversational rows, tiny tokenizer, "
        f"{report['cpus']} CPUs, median of {report['rounds']} interleaved rounds)",
        "",
        "| | ours | TRL | ratio (TRL s ÷ ours s; > 1: ours faster) |",
        "|---|---|---|---|",
        f"| tokenize, s | {ours['first_in_fresh_runtime']} (first in a fresh Ray runtime) | "
        f"{trl['prepare_dataset']} (`_prepare_dataset`, num_proc={report['cpus']}) | "
        f"**{report['data_rows_per_s_ratio_vs_trl']}** |",
        f"| tokenize again (warm workers, fresh output), s | {ours['again_fresh_output']} | "
        f"{trl['prepare_dataset']} | {report['data_rows_per_s_ratio_vs_trl_warm']} |",
        f"| tokenize, TRL incl. `load_dataset`, s | {ours['first_in_fresh_runtime']} | "
        f"{trl['load_dataset_plus_prepare_dataset']} | {report['data_rows_per_s_ratio_vs_trl_with_load']} |",
        f"| one epoch into collated batches of 64, rows/s | {report['epoch_rows_per_s']['ours']} | "
        f"{report['epoch_rows_per_s']['trl']} | {report['epoch_rows_per_s_ratio_vs_trl']} |",
        "",
        "Peak RSS, MB (sampled every 0.25 s over the process tree; workers: Ray's task workers, or TRL's "
        "`datasets.map` pool; Ray services: GCS, raylet, agents):",
        "",
        "| side | rows | driver | largest worker | all workers | Ray services | worker processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, sizes in report["memory_mb"].items():
        for rows, m in sorted(sizes.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {side} | {rows} | {m['driver_mb']} | {m['worker_max_mb']} | {m['workers_sum_mb']} | "
                f"{m['others_sum_mb']} | {m['worker_processes']} |"
            )
    return lines + [""]
