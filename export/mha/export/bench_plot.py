"""The figures of `mha bench export`: speed-ups, PASS/MISS targets, the table and the PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mha.tables import markdown_table

# The `ort` speed-up over torch nn.MultiheadAttention required per (B, L), both masks.
REQUIRED_VS_TORCH: dict[tuple[int, int], float] = {
    (1, 16): 1.5,
    (1, 1024): 1.5,
    (1, 128): 1.05,
    (8, 128): 1.05,
}
TORCH, OURS = "torch nn.MHA", "ours eager"
# Other processes' CPU use (in cores) above which a case's figures are flagged: a 2-thread
# OpenMP region (torch) stalls whenever one of its threads is descheduled.
CONTENDED_CORES = 0.25


def ort_name(target: str) -> str:
    """Contestant name of an export target run by ONNX Runtime."""
    return f"ORT {target}"


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_torch / speedup_vs_none: the other's wall median over this one's; on one
    thread also cpu_speedup_vs_torch / cpu_speedup_vs_none from the CPU ms per call."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["contestant"]] = row
    for row in rows:
        others = by_case[row["case"]]
        for suffix, name in (("torch", TORCH), ("none", ort_name("none"))):
            row[f"speedup_vs_{suffix}"] = others[name]["median_ms"] / row["median_ms"]
            cpu, cpu_other = row.get("cpu_median_ms"), others[name].get("cpu_median_ms")
            if cpu and cpu_other:
                row[f"cpu_speedup_vs_{suffix}"] = cpu_other / cpu


def check_targets(rows: list[dict]) -> list[dict]:
    """The targets of `ort`: vs torch nn.MHA per shape, and never slower
    than `none`. Judged on wall medians (the CPU-time ratio rides along when measured)."""
    checks = []
    for row in rows:
        if row["contestant"] != ort_name("ort"):
            continue
        required = REQUIRED_VS_TORCH.get((row["B"], row["L"]))
        if required is not None:
            checks.append(target(row, "torch", required))
        checks.append(target(row, "none", 1.0))
    return checks


def target(row: dict, versus: str, required: float) -> dict:
    """One PASS/MISS record, with the CPU load other processes put on the machine meanwhile."""
    speedup = row[f"speedup_vs_{versus}"]
    return {
        "case": row["case"],
        "check": "ort vs torch nn.MHA" if versus == "torch" else "ort vs none",
        "speedup": speedup,
        "cpu_speedup": row.get(f"cpu_speedup_vs_{versus}"),
        "required": required,
        "pass": speedup >= required,
        "other_processes_cores": row.get("other_processes_cores"),
    }


def results_table(rows: list[dict]) -> str:
    """One line per case and contestant."""
    header = ["case", "contestant", "median ms", "p10 ms", "p90 ms", "max abs err"]
    header += ["vs torch", "vs none", "cpu ms (1 thread)", "others busy"]
    body = [
        [
            r["case"],
            r["contestant"],
            f"{r['median_ms']:.3f}",
            f"{r['p10_ms']:.3f}",
            f"{r['p90_ms']:.3f}",
            f"{r['max_abs_error']:.1e}",
            f"{r['speedup_vs_torch']:.2f}x",
            f"{r['speedup_vs_none']:.2f}x",
            "-" if r.get("cpu_median_ms") is None else f"{r['cpu_median_ms']:.3f}",
            "?"
            if r["other_processes_cores"] is None
            else f"{r['other_processes_cores']:.2f} cores",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def target_lines(checks: list[dict]) -> str:
    """PASS/MISS lines for the targets, flagging contended measurements."""
    lines = []
    for c in checks:
        line = (
            f"{'PASS' if c['pass'] else 'MISS'}  {c['check']:<20} {c['case']:<16} "
            f"{c['speedup']:.2f}x (target >= {c['required']:.2f}x)"
        )
        if c.get("cpu_speedup") is not None:
            line += f" (CPU time: {c['cpu_speedup']:.2f}x)"
        others = c.get("other_processes_cores")
        if others is not None and others >= CONTENDED_CORES:
            line += f"  [contended: other processes kept {others:.2f} cores busy]"
        lines.append(line)
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Two panels: median ms (log, p10-p90 whiskers) and speed-up over torch nn.MHA."""
    # Figure + Agg canvas rather than pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

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
    settings, machine = report["settings"], report["machine_before"]
    times.set_title(
        f"self-attention, d_model {settings['d_model']}, {settings['num_heads']} heads, fp32; "
        f"{machine['threads']} threads on {machine['cores']} cores "
        f"(load {machine['loadavg'][0]:.1f})"
    )
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_yscale("log")
    speed.set_ylabel("speed-up over torch nn.MHA (log)")
    times_x = FuncFormatter(lambda value, _: f"{value:g}x")
    speed.yaxis.set_major_formatter(times_x)
    speed.yaxis.set_minor_formatter(times_x)
    figure.legend(*times.get_legend_handles_labels(), loc="outside lower center", ncols=5)
    speed.set_xticks(x, [tick_label(case, rows[(case, TORCH)]) for case in cases], rotation=20)
    figure.savefig(path, dpi=110)


def tick_label(case: str, row: dict) -> str:
    """The case id, marked when other processes loaded the machine while it was timed."""
    others = row.get("other_processes_cores")
    if others is None or others < CONTENDED_CORES:
        return case
    return f"{case}\n(contended: {others:.1f} cores)"
