"""The PNG of `mha bench export`: median times and speed-ups per contestant per case."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(report: dict, path: Path) -> None:
    """Two panels: median ms (log, p10-p90 whiskers) and speed-up over torch nn.MHA."""
    # Figure + Agg canvas rather than pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cases, contestants = report["cases"], report["contestants"]
    rows = {(r["case"], r["contestant"]): r for r in report["results"]}
    figure = Figure(figsize=(max(8.0, 1.3 * len(cases) + 3), 8), layout="constrained")
    FigureCanvasAgg(figure)
    times, speed = figure.subplots(2, 1, sharex=True)
    x = np.arange(len(cases))
    width = 0.8 / len(contestants)
    for i, name in enumerate(contestants):
        picked = [rows[(case, name)] for case in cases]
        median = np.array([r["median_ms"] for r in picked])
        whiskers = np.array(
            [median - [r["p10_ms"] for r in picked], [r["p90_ms"] for r in picked] - median]
        )
        offset = x + (i - (len(contestants) - 1) / 2) * width
        times.bar(offset, median, width, yerr=whiskers, capsize=2, label=name)
        speed.bar(offset, [r["speedup_vs_torch"] for r in picked], width, label=name)
    times.set_yscale("log")
    times.set_ylabel("median ms per call (p10-p90)")
    times.legend(ncols=len(contestants), fontsize="small", loc="upper left")
    settings, machine = report["settings"], report["machine_before"]
    times.set_title(
        f"self-attention, d_model {settings['d_model']}, {settings['num_heads']} heads, fp32; "
        f"{machine['threads']} threads on {machine['cores']} cores "
        f"(load {machine['loadavg'][0]:.1f})"
    )
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_ylabel("speed-up over torch nn.MHA (x)")
    speed.set_xticks(x, cases, rotation=20)
    figure.savefig(path, dpi=110)
