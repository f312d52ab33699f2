"""`make fuzz`: the fuzz of tests/service/test_fuzz.py for minutes; non-zero on a failure.

    python tests/service/fuzz_long.py [--minutes M] [--seed N] [--probe-every K]

Exports the fuzz models (fuzz_strategies.MODELS) into a temporary repository, serves them
on port 0 (harness.RunningServer, fuzz_property.SERVER_SETTINGS) and sends calls drawn from
fuzz_strategies.calls() until the time is up: batches of random (not derandomized) hypothesis
runs, each with its own seed, without shrinking, so a failure does not stop the run. Every
distinct failure (fuzz_property.Problem.key) is printed when first seen and at the end with
the smallest call that showed it. The short test shrinks what it finds; this run is for the
rare failures. FUZZ_MINUTES sets the default duration (5).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # as pytest sees them: fuzz_*, harness

from fuzz_property import SERVER_SETTINGS, Fuzzer, Problem, size  # noqa: E402
from fuzz_strategies import calls  # noqa: E402
from fuzz_values import MODELS, Call, E  # noqa: E402
from harness import RunningServer, settings_for  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

BATCH = 200  # examples per hypothesis run; each run draws afresh from its own seed
PROGRESS_SECONDS = 30.0


@dataclass
class LongRun:
    """Sends calls until `deadline`, probing every `probe_every`; keeps each failure's
    smallest call."""

    fuzzer: Fuzzer
    deadline: float
    probe_every: int
    examples: int = 0
    failures: dict[str, tuple[Problem, Call | None]] = field(default_factory=dict)
    seen: Counter[str] = field(default_factory=Counter)  # failure key -> times
    last_progress: float = field(default_factory=time.monotonic)

    def check(self, call: Call) -> None:
        if time.monotonic() >= self.deadline:
            return  # the rest of this batch is skipped at once
        problems = self.fuzzer.run(call)
        self.examples += 1
        if self.examples % self.probe_every == 0:
            problems += self.fuzzer.probe()
        for problem in problems:
            self.record(problem, call)
        if time.monotonic() - self.last_progress > PROGRESS_SECONDS:
            self.last_progress = time.monotonic()
            left = max(0.0, self.deadline - self.last_progress)
            print(
                f"... {self.examples} calls, {self.fuzzer.requests} requests, "
                f"{len(self.failures)} failure kinds, {left:.0f} s left",
                flush=True,
            )

    def record(self, problem: Problem, call: Call | None) -> None:
        """Count the failure; keep its smallest call (None: the final probe, after all calls)."""
        known = self.failures.get(problem.key)
        self.seen[problem.key] += 1
        if known is None:
            print(f"FAILURE {problem.key}: {problem.message}\n  call: {call!r}", flush=True)
        if known is None or (
            call is not None and (known[1] is None or size(call) < size(known[1]))
        ):
            self.failures[problem.key] = (problem, call)

    def batch(self, batch_seed: int) -> None:
        @seed(batch_seed)
        @settings(
            max_examples=BATCH,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(call=calls())
        def draw(call: Call) -> None:
            self.check(call)

        draw()


def export_models(repository: Path) -> None:
    """The fuzz models, as version 1 of their names (the test suite's `exported` fixture)."""
    from mha.export import ExportOptions, export_model

    for name, fields in MODELS.items():
        options = ExportOptions(repository=repository, name=name, d_model=E, num_heads=4, **fields)
        export_model(options, progress=lambda _: None)


def report(run: LongRun, started: float) -> int:
    print(f"\n{run.examples} calls in {time.monotonic() - started:.0f} s")
    print(run.fuzzer.summary(refusals=25))
    if not run.failures:
        print("no failures")
        return 0
    print(f"\n{len(run.failures)} distinct failure(s):")
    for key, (problem, call) in sorted(run.failures.items()):
        print(f"- {key} ({run.seen[key]} time(s)): {problem.message}\n  smallest call: {call!r}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("FUZZ_MINUTES", 5)))
    parser.add_argument("--seed", type=int, default=None, help="first batch's seed (random)")
    parser.add_argument("--probe-every", type=int, default=25, help="calls between probes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # the server's tracebacks of INTERNAL errors
    base_seed = args.seed if args.seed is not None else random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="mha-fuzz-") as tmp:
        print(f"exporting {len(MODELS)} models ...", flush=True)
        export_models(Path(tmp))
        server = RunningServer(settings_for(Path(tmp), **SERVER_SETTINGS)).load()
        try:
            print(f"fuzzing {server.url} for {args.minutes:g} min, seed {base_seed}", flush=True)
            started = time.monotonic()
            run = LongRun(Fuzzer(server.channel), started + args.minutes * 60, args.probe_every)
            try:
                batch = 0
                while time.monotonic() < run.deadline:
                    run.batch(base_seed + batch)
                    batch += 1
            except KeyboardInterrupt:
                print("interrupted")
            for problem in run.fuzzer.probe():  # the server still answers right at the end
                run.record(problem, None)
            return report(run, started)
        finally:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
