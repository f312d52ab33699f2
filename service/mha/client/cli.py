"""`mha infer`: send one inference request to an Open Inference Protocol gRPC server.

Inputs are seeded random arrays of the asked B/L/S, shaped from the server's ModelMetadata,
or .npy files, or a sentence (--text) made into a checkpoint's layer-0 attention input with
its own tokenizer and embeddings (--hf DIR; mha.client.text). Prints each output's shape
and statistics and the round-trip latency;
optionally checks the answer against the ONNX model run locally (--compare) and draws the
attention weights (--plot). Server errors print as one line: `<CODE>: <details>`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mha import contract
from mha.client import security
from mha.client.compare import CompareError, OutputDiff, compare
from mha.client.core import DEFAULT_MAX_MESSAGE_BYTES, ClientError, InferResult
from mha.client.inputs import InputError, Sizes, build_inputs, load_arrays, output_names
from mha.client.plot import PlotUnavailable, attention_heatmaps
from mha.client.sync import Client
from mha.client.tensors import CheckpointError
from mha.client.text import TextInput, text_input
from mha.errors import CliError

WEIGHTS = "attention_weights"


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    target = parser.add_argument_group("server")
    target.add_argument(
        "--url",
        default="localhost:8001",
        help="host:port of the gRPC server (default: %(default)s)",
    )
    target.add_argument("--model", default="mha", help="model name (default: %(default)s)")
    target.add_argument("--version", default="", help="model version (default: the latest)")
    target.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per RPC (default: %(default)s)"
    )
    target.add_argument("--id", default="", help="request id (echoed by the server)")
    target.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    inputs = parser.add_argument_group("inputs (random, seeded, unless files are given)")
    inputs.add_argument(
        "-b", "--batch", type=int, default=1, help="B, samples (default: %(default)s)"
    )
    inputs.add_argument(
        "-l", "--length", type=int, default=16, help="L, query length (default: %(default)s)"
    )
    inputs.add_argument("-s", "--source-length", type=int, help="S, key length (default L)")
    inputs.add_argument("--seed", type=int, default=0, help="random inputs' seed (default: 0)")
    for name in ("query", "key", "value", "mask"):
        inputs.add_argument(f"--{name}", type=Path, metavar="NPY", help=f"{name} from a .npy file")
    inputs.add_argument("--padded", type=int, default=0, metavar="N", help="mask the last N keys")
    inputs.add_argument("--typed", action="store_true", help="typed contents instead of raw")
    text = parser.add_argument_group("text (a sentence as a checkpoint's layer-0 input)")
    text.add_argument("--text", help="the sentence (needs --hf; tokenizers package)")
    text.add_argument("--hf", type=Path, metavar="DIR", help="the Hugging Face checkpoint folder")
    text.add_argument(
        "--hf-stack",
        choices=("encoder", "decoder"),
        default=None,
        help="BART: which stack's embeddings (default decoder, as mha export --hf)",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--outputs", help="comma-separated output names (default: the server's)")
    out.add_argument("--attention-weights", action="store_true", help=f"also ask for {WEIGHTS}")
    out.add_argument("--compare", type=Path, metavar="PATH", help="model.onnx or version folder")
    out.add_argument("--plot", type=Path, metavar="FILE.png", help="attention heatmap per head")
    security.add_arguments(parser)


def requested_outputs(args: argparse.Namespace, available: Sequence[str]) -> list[str]:
    """Output names to ask for; empty = the server's default outputs."""
    names = [n.strip() for n in args.outputs.split(",") if n.strip()] if args.outputs else []
    if (args.attention_weights or args.plot) and WEIGHTS not in names:
        if WEIGHTS not in available:
            raise CliError(
                f"model {args.model!r} has no {WEIGHTS} output (outputs: {', '.join(available)});"
                " export it with --attention-weights"
            )
        names = names or [n for n in available if n != WEIGHTS]
        names.append(WEIGHTS)
    return names


def describe(name: str, array: np.ndarray) -> str:
    """One line: name, datatype, shape and summary statistics of an array."""
    values = array.astype(np.float64)
    finite = values[np.isfinite(values)]
    nans = int(np.count_nonzero(np.isnan(values)))
    if finite.size == 0:
        stats = "no finite values"
    else:
        stats = (
            f"mean {finite.mean():+.4g}  std {finite.std():.4g}  "
            f"min {finite.min():+.4g}  max {finite.max():+.4g}"
        )
    header = f"  {name:<18} {contract.datatype_of(array):<4} {list(array.shape)!s:<16}"
    return f"{header} {stats}  NaN {nans}"


def print_result(args: argparse.Namespace, inputs: Mapping[str, np.ndarray], result: InferResult):
    print(f"model {result.model_name} version {result.model_version} id {result.id!r} ({args.url})")
    print("inputs:")
    for name, array in inputs.items():
        print(f"  {name:<18} {contract.datatype_of(array):<4} {list(array.shape)}")
    print("outputs:")
    for name, array in result.outputs.items():
        print(describe(name, array))
    print(f"latency {result.latency_s * 1e3:.3f} ms (round trip)")


def print_diffs(diffs: Sequence[OutputDiff]) -> bool:
    """Print the comparison per output; True when every output is within tolerance."""
    for d in diffs:
        verdict = "ok" if d.passed else "FAIL"
        nan_note = f", {d.nan_mismatches} NaN mismatches" if d.nan_mismatches else ""
        print(
            f"compare {d.name}: max abs error {d.max_abs_error:.3g} "
            f"(atol {d.atol:g}, rtol {d.rtol:g}{nan_note}): {verdict}"
        )
    return all(d.passed for d in diffs)


def connect(args: argparse.Namespace) -> Client:
    """The client the flags describe (--url, --timeout, --max-message-bytes, security)."""
    try:
        secured = security.from_args(args)
    except ValueError as err:
        raise CliError(str(err)) from None
    return Client(
        args.url, timeout=args.timeout, max_message_bytes=args.max_message_bytes,
        security=secured,
    )  # fmt: skip


def read_text(args: argparse.Namespace) -> TextInput | None:
    """The --text input, or None; CliError for --text without --hf or a bad checkpoint."""
    if args.text is None:
        if args.hf is not None:
            raise CliError("--hf gives the checkpoint that --text is tokenized with: add --text")
        return None
    if args.hf is None:
        raise CliError("--text needs --hf DIR (the checkpoint's tokenizer and embeddings)")
    if args.query is not None:
        raise CliError("--text makes the query: drop --query")
    try:
        return text_input(args.hf, args.text, args.hf_stack)
    except CheckpointError as err:
        raise CliError(str(err)) from None


def check_text_model(metadata, text: TextInput | None) -> None:
    """Refuse --text for a model that takes key and value (cross-attention)."""
    names = {t.name for t in metadata.inputs}
    if text is not None and contract.KEY in names:
        raise CliError(
            f"--text is the input of a self-attention layer; model {metadata.name!r} "
            f"also takes {contract.KEY} and {contract.VALUE}"
        )


def run(args: argparse.Namespace) -> int:
    text = read_text(args)
    try:
        with connect(args) as c:
            metadata = c.model_metadata(args.model, args.version)
            check_text_model(metadata, text)
            outputs = requested_outputs(args, output_names(metadata))
            given = load_arrays({n: getattr(args, n) for n in ("query", "key", "value")})
            given.update(load_arrays({"key_padding_mask": args.mask}))
            if text is not None:
                given[contract.QUERY] = text.query
            sizes = Sizes(args.batch, args.length, args.source_length)
            inputs = build_inputs(metadata, given, sizes, seed=args.seed, padded=args.padded)
            result = c.infer(
                args.model,
                inputs,
                outputs,
                version=args.version,
                request_id=args.id,
                typed=args.typed,
            )
    except ClientError as err:
        raise CliError(" ".join(str(err).split())) from None
    except (InputError, ValueError) as err:
        raise CliError(str(err)) from None
    print_result(args, inputs, result)
    if text is not None:
        print(f"tokens ({len(text.tokens)}): {' '.join(text.tokens)}")
    status = 0
    if args.compare is not None:
        try:
            diffs = compare(args.compare, inputs, result.outputs)
        except CompareError as err:
            raise CliError(str(err)) from None
        status = 0 if print_diffs(diffs) else 1
    if args.plot is not None:
        try:
            attention_heatmaps(
                result.outputs[WEIGHTS],
                args.plot,
                title=f"{args.model}: {WEIGHTS}",
                labels=None if text is None else text.tokens,
            )
        except PlotUnavailable as err:
            raise CliError(str(err)) from None
        print(f"wrote {args.plot}")
    return status
