"""One report for every benchmark: tables, targets with verdicts, bench.json, the figure.

Records are plain dicts (what bench.json holds). A target is a measured value against its
bound, with ok True, False or None (nothing measured it) and a verdict PASS, MISS or n/a.
bench.json is strict JSON (NaN and infinities as null) and records the machine: cores and
the load average before and after, because the machine may be shared.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mha.tables import cell
from mha.tables import markdown_table as table

Row = dict[str, Any]


def say(text: str) -> None:
    """A progress line for people, on stderr."""
    print(text, file=sys.stderr, flush=True)


def find(points: Sequence[Row], **where: Any) -> Row | None:
    """The first point matching every field given."""
    return next((p for p in points if all(p.get(k) == v for k, v in where.items())), None)


def value(record: Row | None, key: str) -> float:
    """A record's figure, NaN when the record or the figure is missing."""
    found = None if record is None else record.get(key)
    return math.nan if found is None else float(found)


def ratio(top: Row | None, bottom: Row | None, key: str) -> float:
    under = value(bottom, key)
    return value(top, key) / under if under else math.nan


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    finite = [s for s in seconds if math.isfinite(s)]
    return float(np.percentile(finite, q) * 1e3) if finite else None


def target(
    name: str,
    measured: Any,
    bound: Any,
    higher_is_better: bool | None = None,
    ok: bool | None = None,
    **extra: Any,
) -> Row:
    """One target: the measured value against its bound (ok from the comparison when
    higher_is_better is given; n/a when either is missing)."""
    numbers = isinstance(measured, int | float) and isinstance(bound, int | float)
    if higher_is_better is not None:
        ok = None
        if numbers and not (math.isnan(measured) or math.isnan(bound)):
            ok = measured >= bound if higher_is_better else measured <= bound
    return {
        **extra,
        "target": name,
        "value": measured,
        "bound": bound,
        "ok": ok,
        "verdict": verdict(ok),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def targets_table(targets: Sequence[Row], phase: bool = False) -> str:
    rows = [
        [*([t["phase"]] if phase else []), t["target"], t["value"], t["bound"], verdict(t["ok"])]
        for t in targets
    ]
    return table([*(["phase"] if phase else []), "target", "measured", "bound", "verdict"], rows)


def target_lines(targets: Sequence[Row]) -> str:
    """One line per target: PASS/MISS/n/a, [phase:] its name, the value and the bound."""
    return "\n".join(
        f"{verdict(t['ok']):<4}  "
        + (f"{t['phase']}: " if "phase" in t else "")
        + f"{t['target']}: measured {cell(t['value'])}, bound {cell(t['bound'])}"
        for t in targets
    )


def machine(load_before: tuple[float, float, float]) -> Row:
    """The JSON record of the machine: cores, load average before and now."""
    return {
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "shared machine: other processes may compete for the cores",
    }


def run_record(started: float, load_before: tuple[float, float, float]) -> Row:
    """The head of every bench.json: when it started, how long it took, the machine."""
    return {"started": started, "seconds": time.time() - started, "machine": machine(load_before)}


def load_heading(title: str, machine: Row) -> str:
    """A table's heading with the machine's load average before and after the run."""
    return (
        f"\n{title} (load average before {machine['loadavg_before'][0]:.2f}, after "
        f"{machine['loadavg_after'][0]:.2f}; {machine['cpus']} CPUs, shared machine)"
    )


def finite_json(found: Any) -> Any:
    """The document with NaN and infinities as None, so strict JSON can hold it."""
    if isinstance(found, float):
        return found if math.isfinite(found) else None
    if isinstance(found, dict):
        return {k: finite_json(v) for k, v in found.items()}
    if isinstance(found, list | tuple):
        return [finite_json(v) for v in found]
    return found


def write(
    out: Path,
    document: Row,
    markdown: str | None = None,
    plot: Callable[[Path], None] | None = None,
) -> None:
    """bench.json, and bench.md and bench.png when given; a line that says what was written."""
    (out / "bench.json").write_text(json.dumps(finite_json(document), indent=1, allow_nan=False))
    written = []
    if markdown is not None:
        (out / "bench.md").write_text(markdown + "\n")
        written.append("bench.md")
    if plot is not None:
        plot(out / "bench.png")
        written.append("bench.png")
    print(f"\nwrote {out / 'bench.json'}" + "".join(f" and {w}" for w in written))


def pyplot(command: str) -> Any:
    """matplotlib's pyplot, or None (said on stderr) when the plot extra is missing."""
    from mha.client.plot import PlotUnavailable, pyplot

    try:
        return pyplot()
    except PlotUnavailable as err:
        say(f"mha bench {command}: no plot: {err}")
        return None


def lines_plot(
    command: str,
    records: Sequence[Row],
    x: str,
    xlabel: str,
    panels: Sequence[tuple[str, str, str | None]],
    path: Path,
    title: str,
) -> None:
    """Side-by-side log-log panels, one line per (contestant, sequences) over `x`; a panel is
    (key, y label, a second key drawn dashed in the same colour, e.g. p99 beside p50)."""
    plt = pyplot(command)
    if plt is None:
        return
    lines: dict[str, list[Row]] = {}
    for r in sorted(records, key=lambda r: r[x]):
        lines.setdefault(f"{r['contestant']} x{r['sequences']}", []).append(r)
    ticks = sorted({r[x] for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.6), squeeze=False)
    for ax, (key, ylabel, dashed) in zip(axes[0], panels, strict=True):
        for label, line in lines.items():
            xs = [r[x] for r in line]
            drawn = ax.plot(xs, [r[key] for r in line], "o-", label=label)
            if dashed:
                ax.plot(
                    xs,
                    [r[dashed] for r in line],
                    "x--",
                    color=drawn[0].get_color(),
                    label=f"{label} {dashed.split('_')[0]}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


Column = tuple[str, "str | Callable[[Row], Any]"]  # a header and a record's key or getter


def columns_table(records: Sequence[Row], columns: Sequence[Column]) -> str:
    """One row per record, one column per (header, key or getter)."""
    rows = [[get(r) if callable(get) else r.get(get) for _, get in columns] for r in records]
    return table([header for header, _ in columns], rows)


def versus(points: Sequence[Row], top: str, bottom: str, where: Sequence[str]) -> list[Row]:
    """For every point of contender `bottom`, the point of `top` at the same `where`, as one
    record {"top": ..., "bottom": ...} (top None when it was not measured)."""
    return [{"top": find(points, contestant=top, **{k: b[k] for k in where}), "bottom": b}
            for b in points if b["contestant"] == bottom]  # fmt: skip


def scaled(key: str, unit: float) -> Callable[[Row], float | None]:
    """A getter of key / unit (None stays None): bytes as MB, and the like."""
    return lambda r: None if r.get(key) is None else r[key] / unit


def paired(top: str, bottom: str, key: str, unit: str) -> tuple[Column, Column]:
    """Columns of a versus() record: the figure of the top contender, then the bottom's."""
    return ((f"{top} {unit}", lambda v: value(v["top"], key)),
            (f"{bottom} {unit}", lambda v: value(v["bottom"], key)))  # fmt: skip


def ratio_column(header: str, key: str, inverse: bool = False) -> Column:
    """top / bottom of a versus() record (bottom / top when inverse)."""
    sides = ("bottom", "top") if inverse else ("top", "bottom")
    return header, lambda v: ratio(v[sides[0]], v[sides[1]], key)


def workload_columns(*keys: tuple[str, str]) -> tuple[Column, ...]:
    """(header, key) of the bottom record of versus(): where the pair was measured."""
    return tuple((header, lambda v, k=key: v["bottom"][k]) for header, key in keys)
