"""`mha decode`: decode random sequences against a sequence model, step by step.

Each sequence sends a random prompt of --prompt tokens, then --steps steps of --tokens new
tokens, over one ModelStreamInfer stream (requests of all sequences interleaved) or unary
calls (--unary). With --compare MODEL_DIR every answer is checked against the full causal
forward run locally: the model's own step graph from an empty cache over the whole sequence
so far, which the export proved equal to eager PyTorch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mha import contract
from mha.client.compare import CompareError, model_files, tolerance
from mha.client.core import DEFAULT_MAX_MESSAGE_BYTES, ClientError, SequenceStep
from mha.client.sync import Client
from mha.errors import CliError


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("--url", default="localhost:8001", help="host:port (default: %(default)s)")
    parser.add_argument("--model", default="mha", help="model name (default: %(default)s)")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default: 16)")
    parser.add_argument("--steps", type=int, default=32, help="steps after it (default: 32)")
    parser.add_argument("--tokens", type=int, default=1, help="new tokens per step (default: 1)")
    parser.add_argument("--sequences", type=int, default=1,
                        help="sequences decoded at once (default: 1)")  # fmt: skip
    parser.add_argument("--unary", action="store_true", help="ModelInfer calls, not a stream")
    parser.add_argument(
        "--compare", type=Path, metavar="MODEL_DIR",
        help="check every step against the full causal forward run locally",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random tokens' seed (default: 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per RPC")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)


@dataclass
class Decoded:
    """One sequence: what it sent, what came back, and how long each step took."""

    sequence_id: str
    sent: list[np.ndarray] = field(default_factory=list)
    answers: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def plan(args: argparse.Namespace, width: int, dtype: np.dtype) -> list[Decoded]:
    if min(args.prompt, args.tokens, args.sequences) < 1 or args.steps < 0:
        raise CliError("--prompt, --tokens and --sequences must be >= 1 and --steps >= 0")
    rng = np.random.default_rng(args.seed)
    sequences = [Decoded(f"decode-{args.seed}-{i}") for i in range(args.sequences)]
    for decoded in sequences:
        for size in [args.prompt] + [args.tokens] * args.steps:
            decoded.sent.append(rng.standard_normal((1, size, width)).astype(dtype))
    return sequences


def control(decoded: Decoded, step: int) -> SequenceStep:
    return SequenceStep(decoded.sequence_id, start=step == 0, end=step == len(decoded.sent) - 1)


def run_unary(client: Client, args: argparse.Namespace, sequences: list[Decoded]) -> None:
    for step in range(len(sequences[0].sent)):
        for decoded in sequences:
            inputs = {contract.QUERY: decoded.sent[step]}
            step_of = control(decoded, step)
            result = client.infer(args.model, inputs, version=args.version, sequence=step_of)
            decoded.answers.append(result.outputs[contract.OUTPUT])
            decoded.seconds.append(result.latency_s)


def run_stream(client: Client, args: argparse.Namespace, sequences: list[Decoded]) -> None:
    """Round robin over one stream: send one step of every sequence, then take the answers."""
    with client.stream() as stream:
        for step in range(len(sequences[0].sent)):
            started = time.perf_counter()
            for decoded in sequences:
                stream.send(args.model, {contract.QUERY: decoded.sent[step]}, version=args.version,
                            request_id=f"{decoded.sequence_id}/{step}",
                            sequence=control(decoded, step))  # fmt: skip
            by_id = {}
            for answer in stream.answers(len(sequences)):
                if answer.error is not None:
                    raise answer.error
                by_id[answer.id] = answer
            for decoded in sequences:
                answer = by_id[f"{decoded.sequence_id}/{step}"]
                assert answer.result is not None
                decoded.answers.append(answer.result.outputs[contract.OUTPUT])
                decoded.seconds.append(time.perf_counter() - started)


def full_forward(model_dir: Path):  # type: ignore[no-untyped-def]
    """The local oracle: the step graph from an empty cache over a whole sequence."""
    import onnxruntime as ort

    model, config = model_files(model_dir)
    if not (config or {}).get("sequence"):
        raise CompareError(
            f"--compare {model_dir}: not a sequence model (no 'sequence' in mha.json)"
        )
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def run(tokens: np.ndarray) -> np.ndarray:
        empty = np.zeros((1, 0, tokens.shape[2]), tokens.dtype)
        feeds = {contract.QUERY: tokens, contract.PAST_KEY: empty, contract.PAST_VALUE: empty,
                 contract.KEY_PADDING_MASK: np.zeros((1, tokens.shape[1]), bool)}  # fmt: skip
        return np.asarray(session.run([contract.OUTPUT], feeds)[0])

    return run, tolerance(config)


def compare_steps(model_dir: Path, sequences: list[Decoded]) -> bool:
    """Print the worst error per sequence; True when every step is within tolerance."""
    run, (atol, rtol) = full_forward(model_dir)
    passed = True
    for decoded in sequences:
        worst, worst_step = 0.0, 0
        for step, answer in enumerate(decoded.answers):
            want = run(np.concatenate(decoded.sent[: step + 1], axis=1))[:, -answer.shape[1] :]
            diff = np.abs(answer.astype(np.float64) - want)
            ratio = float((diff / (atol + rtol * np.abs(want))).max())
            if ratio > worst:
                worst, worst_step = ratio, step
        ok = worst <= 1.0
        passed &= ok
        print(f"compare {decoded.sequence_id}: {len(decoded.answers)} steps, worst step "
              f"{worst_step} at {worst:.3g}x the tolerance (atol {atol:g}, rtol {rtol:g}): "
              f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    return passed


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, timeout=args.timeout, max_message_bytes=args.max_message_bytes) as c:
            metadata = c.model_metadata(args.model, args.version)
            query = next((t for t in metadata.inputs if t.name == contract.QUERY), None)
            if query is None or metadata.inputs[0].datatype not in contract.DTYPES:
                raise CliError(f"model {args.model!r} takes no float query input")
            sequences = plan(args, int(query.shape[-1]), contract.DTYPES[query.datatype])
            started = time.perf_counter()
            (run_unary if args.unary else run_stream)(c, args, sequences)
            seconds = time.perf_counter() - started
    except ClientError as err:
        raise CliError(" ".join(str(err).split())) from None
    report(args, sequences, seconds)
    if args.compare is None:
        return 0
    try:
        return 0 if compare_steps(args.compare, sequences) else 1
    except CompareError as err:
        raise CliError(str(err)) from None


def report(args: argparse.Namespace, sequences: list[Decoded], seconds: float) -> None:
    tokens = sum(int(sum(s.shape[1] for s in d.sent)) for d in sequences)
    steps = [t for d in sequences for t in d.seconds[1:]] or [0.0]
    how = "unary" if args.unary else "one stream"
    print(f"model {args.model} ({args.url}, {how}): {len(sequences)} sequence(s), prompt "
          f"{args.prompt}, {args.steps} steps of {args.tokens} token(s)")  # fmt: skip
    p50, p99 = (float(np.percentile(steps, q)) * 1e3 for q in (50, 99))
    print(f"{tokens} tokens in {seconds:.3f} s: {tokens / seconds:.0f} tokens/s; step latency "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")  # fmt: skip
