"""`mha decode`: decode random sequences against a sequence model, step by step.

Each sequence sends a random prompt of --prompt tokens, then --steps steps of --tokens new
tokens, over one ModelStreamInfer stream (requests of all sequences interleaved) or unary
calls (--unary). Against a cross-attention memory model (`--cross --kv-cache`) the first
request also carries a random memory of --memory tokens (the last --padded of them masked),
which the server holds for the later steps. With --compare MODEL_DIR every answer is checked
against the model's own graphs run locally: for a KV-cache model the full causal forward
(the step graph from an empty cache over the whole sequence so far), for a memory model the
memory projected by memory.onnx and the step over it; the export proved both equal to eager
PyTorch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mha import contract
from mha.client import security
from mha.client.cli import connect
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
        "--memory",
        type=int,
        default=32,
        help="memory tokens of a cross-attention memory model (default: 32)",
    )
    parser.add_argument("--padded", type=int, default=0,
                        help="of them, masked as padding at the end (default: 0)")  # fmt: skip
    parser.add_argument(
        "--compare", type=Path, metavar="MODEL_DIR",
        help="check every step against the full causal forward run locally",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random tokens' seed (default: 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per RPC")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    security.add_arguments(parser)


@dataclass
class Decoded:
    """One sequence: what it sent, what came back, and how long each step took."""

    sequence_id: str
    sent: list[np.ndarray] = field(default_factory=list)
    memory: dict[str, np.ndarray] = field(default_factory=dict)  # sent with the first step
    answers: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def plan(args: argparse.Namespace, widths: dict[str, int], dtype: np.dtype) -> list[Decoded]:
    """Random tokens per sequence; widths: query's E, and key's / value's for a memory."""
    if min(args.prompt, args.tokens, args.sequences, args.memory) < 1 or args.steps < 0:
        raise CliError("--prompt, --tokens, --sequences, --memory must be >= 1, --steps >= 0")
    if not 0 <= args.padded <= args.memory:
        raise CliError(f"--padded {args.padded} must be between 0 and --memory {args.memory}")
    rng = np.random.default_rng(args.seed)
    sequences = [Decoded(f"decode-{args.seed}-{i}") for i in range(args.sequences)]
    for decoded in sequences:
        for size in [args.prompt] + [args.tokens] * args.steps:
            decoded.sent.append(
                rng.standard_normal((1, size, widths[contract.QUERY])).astype(dtype)
            )
        if contract.KEY in widths:
            decoded.memory = random_memory(rng, args, widths, dtype)
    return sequences


def random_memory(
    rng: np.random.Generator, args: argparse.Namespace, widths: dict[str, int], dtype: np.dtype
) -> dict[str, np.ndarray]:
    mask = np.zeros((1, args.memory), bool)
    mask[0, args.memory - args.padded :] = True
    return {
        name: rng.standard_normal((1, args.memory, widths[name])).astype(dtype)
        for name in (contract.KEY, contract.VALUE)
    } | {contract.KEY_PADDING_MASK: mask}


def step_inputs(decoded: Decoded, step: int) -> dict[str, np.ndarray]:
    return {contract.QUERY: decoded.sent[step], **(decoded.memory if step == 0 else {})}


def control(decoded: Decoded, step: int) -> SequenceStep:
    return SequenceStep(decoded.sequence_id, start=step == 0, end=step == len(decoded.sent) - 1)


def run_unary(client: Client, args: argparse.Namespace, sequences: list[Decoded]) -> None:
    for step in range(len(sequences[0].sent)):
        for decoded in sequences:
            inputs = step_inputs(decoded, step)
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
                stream.send(args.model, step_inputs(decoded, step), version=args.version,
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


def local_oracle(model_dir: Path):  # type: ignore[no-untyped-def]
    """oracle(decoded, step) -> the rows the step must answer, and the model's tolerance."""
    import onnxruntime as ort

    model, config = model_files(model_dir)
    sequence = (config or {}).get("sequence")
    if not sequence:
        raise CompareError(f"--compare {model_dir}: not a sequence model (mha.json: no sequence)")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    if sequence.get("kind") == contract.MEMORY_KIND:
        memory = ort.InferenceSession(
            str(model.parent / contract.MEMORY_FILE), providers=["CPUExecutionProvider"]
        )

        def over_memory(decoded: Decoded, step: int) -> np.ndarray:
            sent = decoded.memory
            projected = memory.run(None, {n: sent[n] for n in (contract.KEY, contract.VALUE)})
            feeds = {contract.QUERY: decoded.sent[step], contract.MEMORY_KEY: projected[0],
                     contract.MEMORY_VALUE: projected[1],
                     contract.KEY_PADDING_MASK: sent[contract.KEY_PADDING_MASK]}  # fmt: skip
            return np.asarray(session.run([contract.OUTPUT], feeds)[0])

        return over_memory, tolerance(config)

    def full_causal(decoded: Decoded, step: int) -> np.ndarray:
        tokens = np.concatenate(decoded.sent[: step + 1], axis=1)
        empty = np.zeros((1, 0, tokens.shape[2]), tokens.dtype)
        feeds = {contract.QUERY: tokens, contract.PAST_KEY: empty, contract.PAST_VALUE: empty,
                 contract.KEY_PADDING_MASK: np.zeros((1, tokens.shape[1]), bool)}  # fmt: skip
        rows = np.asarray(session.run([contract.OUTPUT], feeds)[0])
        return rows[:, -decoded.sent[step].shape[1] :]

    return full_causal, tolerance(config)


def compare_steps(model_dir: Path, sequences: list[Decoded]) -> bool:
    """Print the worst error per sequence; True when every step is within tolerance."""
    oracle, (atol, rtol) = local_oracle(model_dir)
    passed = True
    for decoded in sequences:
        worst, worst_step = 0.0, 0
        for step, answer in enumerate(decoded.answers):
            want = oracle(decoded, step)
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
        with connect(args) as c:
            metadata = c.model_metadata(args.model, args.version)
            widths = {t.name: int(t.shape[-1]) for t in metadata.inputs if t.datatype != "BOOL"}
            query = next((t for t in metadata.inputs if t.name == contract.QUERY), None)
            if query is None or query.datatype not in contract.DTYPES:
                raise CliError(f"model {args.model!r} takes no float query input")
            sequences = plan(args, widths, contract.DTYPES[query.datatype])
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
