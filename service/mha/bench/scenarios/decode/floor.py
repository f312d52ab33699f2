"""`mha bench decode`'s table of the cached step against the protocol floor and the
in-process ceiling, with serving's targets for a step."""

from __future__ import annotations

from mha.bench.framework.report import Row, find, ratio, table, target, value

STEP_OVER_FLOOR_MS = 0.15  # serving's targets, for a step: p50 over echo + in-process
SHARE_OF_BOUND = 0.9  # and tokens/s against the bound of the two


def served_vs_floor(points: list[Row]) -> tuple[str, list[Row]]:
    """The cached step over gRPC against the protocol's floor (the echo's step) and the
    in-process ceiling, with serving's targets (`mha bench serve`) where both were measured.

    bound = 1 / (1/echo tokens/s + 1/in-process tokens/s): the protocol and the step's
    compute one after the other on the same cores (the in-process step of one sequence, the
    echo's at the point's sequences). Over = cached p50 - echo p50 - in-process p50, at one
    sequence (with more, a step's latency includes the other sequences' turns).
    """
    rows, targets = [], []
    for cached in (r for r in points if r["contestant"] == "cached"):
        prompt, sequences = cached["prompt"], cached["sequences"]
        echo = find(points, contestant="echo", prompt=prompt, sequences=sequences)
        local = find(points, contestant="in-process", prompt=prompt, sequences=1)
        if echo is None and local is None:
            continue
        rate, echo_rate, local_rate = (value(r, "tokens_per_s") for r in (cached, echo, local))
        bound = 1 / (1 / echo_rate + 1 / local_rate)
        over = cached["p50_ms"] - value(echo, "p50_ms") - value(local, "p50_ms")
        single = sequences == 1
        rows.append(
            [
                prompt,
                sequences,
                value(echo, "p50_ms"),
                value(local, "p50_ms"),
                cached["p50_ms"],
                over if single else None,
                ratio(cached, local, "p50_ms") if single else None,
                echo_rate,
                local_rate,
                bound,
                rate,
                rate / bound,
            ]
        )
        if echo is None or local is None:
            continue
        label = f"P={prompt} x{sequences}"
        if single:
            name = f"{label}: step p50 <= echo + in-process + {STEP_OVER_FLOOR_MS:g} ms"
            targets.append(target(name, over, STEP_OVER_FLOOR_MS, False))
        targets.append(
            target(
                f"{label}: tokens/s >= {SHARE_OF_BOUND:.0%} of bound",
                rate / bound,
                SHARE_OF_BOUND,
                True,
            )
        )
    headers = [
        "P",
        "sequences",
        "echo p50 ms",
        "in-process p50 ms",
        "gRPC p50 ms",
        "over echo + in-process ms",
        "gRPC/in-process p50",
        "echo tokens/s",
        "in-process tokens/s",
        "bound tokens/s",
        "gRPC tokens/s",
        "of bound",
    ]
    return table(headers, rows), targets
