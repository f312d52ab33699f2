"""PNG figures for people: attention heatmaps (`mha infer --plot`) and latency vs throughput.

matplotlib is an optional extra (`plot`): it is imported only here, only when a figure is
asked for, with the Agg backend so no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'mha-serve[plot]' (or matplotlib)"
        ) from None
    return plt


def attention_heatmaps(
    weights: np.ndarray,
    path: Path,
    *,
    sample: int = 0,
    title: str = "",
    labels: Sequence[str] | None = None,
) -> None:
    """One heatmap per head of weights[sample] ([B, h, L, S]), query rows by key columns.

    labels: the tokens of a self-attention input (L = S), written along both axes.
    """
    if weights.ndim != 4:
        raise ValueError(f"attention weights must be [B, h, L, S], got shape {weights.shape}")
    if labels is not None and len(labels) != weights.shape[3]:
        raise ValueError(f"{len(labels)} token labels for {weights.shape[3]} key positions")
    plt = pyplot()
    heads = weights.shape[1]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for head in range(rows * cols):
        ax = axes[head // cols][head % cols]
        if head >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(
            weights[sample, head].astype(np.float32), aspect="auto", cmap="viridis", vmin=0.0
        )
        ax.set_title(f"head {head}")
        if labels is None:
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
        else:
            label_axes(ax, labels, weights.shape[2])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title or f"attention weights, sample {sample}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_axes(ax: Any, labels: Sequence[str], rows: int) -> None:
    """Tokens as the tick labels: keys along x (turned), queries along y."""
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), labels[len(labels) - rows :], fontsize=7)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")


def latency_throughput(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]],
    path: Path,
    title: str = "",
) -> None:
    """One panel per workload, one line per configuration through its load levels.

    panels: workload -> configuration -> (throughput rps, p50 ms, p99 ms) points, in the
    order of increasing load (p50 solid with dots, p99 dashed with crosses).
    """
    plt = pyplot()
    cols = min(len(panels), 3) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    configs = list(dict.fromkeys(c for series in panels.values() for c in series))
    colors = {c: cycle[i % len(cycle)] for i, c in enumerate(configs)}  # same in every panel
    for index, (workload, series) in enumerate(panels.items()):
        ax = axes[index // cols][index % cols]
        for config, points in series.items():
            color = colors[config]
            rps = [p[0] for p in points]
            ax.plot(rps, [p[1] for p in points], "o-", color=color, label=f"{config} p50")
            ax.plot(rps, [p[2] for p in points], "x--", color=color, label=f"{config} p99")
        ax.set_title(f"workload {workload} (B x L)")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.suptitle(title or "latency vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
