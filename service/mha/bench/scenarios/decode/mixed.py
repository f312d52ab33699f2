"""`mha bench decode`'s mixed workload: sequences decoding while long prompts arrive.

MIXED_SEQUENCES sequences of the shortest prompt step `steps` times; once each has stepped
a quarter of them, ARRIVALS sequences of the longest prompt start one after the other (each
its prompt alone, then ended). Per served contender (batching on and off): the decoding
steps' p50 and p99 while a prompt is in flight against the p50 of those without one
(mha.bench.framework.arrivals). Target: p99 during <= DURING_OVER_WITHOUT x p50 without.
"""

from __future__ import annotations

from typing import Any

from mha.bench.framework import report
from mha.bench.framework.arrivals import Mixed, run_mixed
from mha.bench.framework.report import Row, target
from mha.bench.framework.sequences import Request, Served
from mha.client import SequenceStep
from mha.contract import QUERY

MIXED_SEQUENCES = 8
ARRIVALS = 2
DURING_OVER_WITHOUT = 3.0


def measure(
    served: dict[str, Served], workload: Any, arriving: int, width: int, seed: int, repeats: int
) -> list[Row]:
    """The mixed workload against each served contender, `repeats` times, pooled."""
    runs: dict[str, list[Mixed]] = {name: [] for name in served}
    for repeat in range(repeats):
        for name, how in served.items():
            tag = f"{name}-mixed-{repeat}"
            decoding = workload.plans(True, width, seed, tag)
            runs[name].append(
                run_mixed(how, decoding, arrivals(workload, arriving, width, seed, tag),
                          settle=max(1, workload.steps // 4))
            )  # fmt: skip
    return [
        {
            "contestant": name,
            "prompt": workload.prompt,
            "sequences": workload.sequences,
            "arriving_prompt": arriving,
            **Mixed.pooled(found).record(),
        }
        for name, found in runs.items()
    ]


def arrivals(workload: Any, prompt: int, width: int, seed: int, tag: str) -> list[Request]:
    """ARRIVALS prompts of `prompt` tokens, each a sequence started and ended at once."""
    shaped = type(workload)(prompt, 0, ARRIVALS)
    return [
        ({QUERY: tokens}, SequenceStep(f"{tag}-arriving-{i}", start=True, end=True))
        for i, tokens in enumerate(shaped.tokens(width, seed + 1))
    ]


COLUMNS: tuple[report.Column, ...] = (
    ("contestant", "contestant"), ("P", "prompt"), ("sequences", "sequences"),
    ("arriving P", "arriving_prompt"), ("steps without", "steps_without"),
    ("p50 ms without", "without_p50_ms"), ("p99 ms without", "without_p99_ms"),
    ("steps during", "steps_during"), ("p50 ms during", "during_p50_ms"),
    ("p99 ms during", "during_p99_ms"),
    ("p99 during / p50 without", lambda r: _over(r)),
    ("arriving prefill p50 ms", "prefill_p50_ms"),
)  # fmt: skip


def _over(r: Row) -> float | None:
    during, without = r["during_p99_ms"], r["without_p50_ms"]
    return None if during is None or not without else during / without


def print_table(points: list[Row]) -> list[Row]:
    """Print the mixed workload's table; return its targets."""
    print("\ndecoding while long prompts arrive\n" + report.columns_table(points, COLUMNS))
    return [
        target(
            f"{r['contestant']} P={r['prompt']} x{r['sequences']} while P={r['arriving_prompt']} "
            f"arrives: step p99 <= {DURING_OVER_WITHOUT:g}x p50 without",
            _over(r),
            DURING_OVER_WITHOUT,
            False,
        )
        for r in points
    ]
