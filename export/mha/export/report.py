"""Tables for people: the parity report and the export summary."""

from __future__ import annotations

from collections.abc import Sequence

from mha.export.exporter import ExportResult
from mha.tables import markdown_table


def parity_table(result: ExportResult) -> str:
    """One row per case and output: max abs and rel error against the tolerance."""
    rows = []
    for case in result.results:
        for e in case.errors:
            bound = f"{e.atol:g}" + (f" + {e.rtol:.3g}*|eager|" if e.rtol else "")
            verdict = "ok" if e.ok else "FAIL"
            rows.append(
                [case.case_id, e.output, f"{e.max_abs:.2e}", f"{e.max_rel:.2e}", bound, verdict]
            )
    header = ["case", "output", "max abs err", "max rel err", "tolerance", ""]
    return "parity vs fp32 eager PyTorch (ONNX Runtime CPU):\n" + markdown_table(header, rows)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def kind_of(config: dict) -> str:
    """self, cross, self kv-cache (a decoding step graph) or cross kv-cache (a memory)."""
    if "sequence" in config:
        return "self kv-cache" if config["self_attention"] else "cross kv-cache"
    return "self" if config["self_attention"] else "cross"


def summary_table(results: Sequence[ExportResult]) -> str:
    """Target, node, opset, dtype, file size, max errors, time."""
    rows = []
    for r in results:
        cfg = r.config
        errs = cfg["parity"]["max_abs_error"]
        rows.append(
            [
                cfg["target"],
                cfg["node"],
                cfg["opset"],
                cfg["dtype"],
                kind_of(cfg),
                human_bytes(r.file_bytes),
                ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
                f"{r.seconds:.1f} s",
            ]
        )
    header = ["target", "node", "opset", "dtype", "kind", "size", "max abs err", "time"]
    return markdown_table(header, rows)
