"""PNG plots: learned vs target distributions on the expert task, and training curves from metrics rows."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"]
_TARGET_COLOR = "#222222"
_REFERENCE_COLOR = "#bbbbbb"


def _as_table(values) -> list[list[float]]:
    return torch.as_tensor(values, dtype=torch.float64).tolist()


def plot_expert_distributions(
    learned: torch.Tensor | Mapping[str, torch.Tensor],
    target: torch.Tensor,
    reference: torch.Tensor | None,
    path: str | os.PathLike,
    title: str = "Distribution on S(x): learned vs target",
    prompt_labels: Sequence[str] | None = None,
    candidate_labels: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Grouped bars per prompt (one panel each): reference, learned (one or several named), target [P, K].

    `learned` is a [P, K] table or {label: [P, K]} to compare methods (e.g. SPO and DPO) on one figure.
    """
    series = dict(learned) if isinstance(learned, Mapping) else {"learned": learned}
    bars = []  # (label, table, color)
    if reference is not None:
        bars.append(("reference", _as_table(reference), _REFERENCE_COLOR))
    for i, (label, table) in enumerate(series.items()):
        bars.append((label, _as_table(table), _COLORS[i % len(_COLORS)]))
    bars.append(("target", _as_table(target), _TARGET_COLOR))
    num_prompts, num_candidates = len(bars[-1][1]), len(bars[-1][1][0])
    columns = min(4, num_prompts)
    rows = math.ceil(num_prompts / columns)
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.4 * columns, 2.7 * rows + 0.8),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    width = 0.8 / len(bars)
    top = max(max(max(row) for row in table) for _, table, _ in bars)
    for p, axis in enumerate(axes.flat):
        if p >= num_prompts:
            axis.axis("off")
            continue
        for b, (label, table, color) in enumerate(bars):
            offsets = [k - 0.4 + width * (b + 0.5) for k in range(num_candidates)]
            hatch = "//" if label == "target" else None
            face = "white" if label == "target" else color
            axis.bar(offsets, table[p], width, label=label, color=face, edgecolor=color, hatch=hatch)
        axis.set_title(prompt_labels[p] if prompt_labels else f"prompt {p}", fontsize=9)
        axis.set_xticks(range(num_candidates))
        ticks = candidate_labels[p] if candidate_labels else [f"y{k}" for k in range(num_candidates)]
        axis.set_xticklabels([str(tick).rstrip(".") for tick in ticks], fontsize=7, rotation=30, ha="right")
        axis.set_ylim(0, min(1.0, top * 1.12))
        axis.grid(axis="y", alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel("π(y|x) on S", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.suptitle(title, fontsize=10)
    figure.legend(handles, labels, loc="outside lower center", ncol=len(bars), fontsize=8, frameon=False)
    return _save(figure, path)


def plot_curves(
    metrics: Sequence[Mapping] | Mapping[str, Sequence[Mapping]],
    keys: Sequence[str],
    path: str | os.PathLike,
    title: str = "Training curves",
    step_key: str = "step",
) -> Path:
    """One panel per key: value vs step over metrics rows (e.g. metrics.jsonl); rows lacking a key are skipped.

    `metrics` is one run's rows, or {run label: rows} to overlay runs (e.g. SPO and DPO).
    """
    runs = dict(metrics) if isinstance(metrics, Mapping) else {"": metrics}
    columns = min(3, max(1, len(keys)))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows + 0.4), squeeze=False)
    for i, axis in enumerate(axes.flat):
        if i >= len(keys):
            axis.axis("off")
            continue
        plotted = False
        for r, (label, run_rows) in enumerate(runs.items()):
            points = [
                (row.get(step_key, index), float(row[keys[i]]))
                for index, row in enumerate(run_rows)
                if row.get(keys[i]) is not None
            ]
            if points:
                steps, values = zip(*points)
                color = _COLORS[(r if len(runs) > 1 else i) % len(_COLORS)]
                marker = "." if len(points) < 30 else None
                axis.plot(steps, values, color=color, linewidth=1.4, marker=marker, label=label or None)
                plotted = True
        if not plotted:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="gray")
        elif len(runs) > 1:
            axis.legend(fontsize=7, frameon=False)
        axis.set_title(keys[i], fontsize=9)
        axis.set_xlabel(step_key, fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
