"""`mha export`: export a model to ONNX with one fused attention node, validated.

This module is imported by the `mha` dispatcher for every command, so it must not import
torch at module level: the export machinery is imported inside run().
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mha.errors import CliError

NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export")


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    """Flags of `mha export`."""
    out = parser.add_argument_group("output")
    out.add_argument("--repository", type=Path, default=Path("models"), help="model repository")
    out.add_argument("--name", default="mha", help="model name (folder)")
    out.add_argument("--version", type=int, default=1, help="model version (folder)")
    out.add_argument(
        "--if-missing", action="store_true", help="do nothing when that version exists"
    )
    out.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="weights in model.onnx.data (auto: when over 256 MiB)",
    )
    graph = parser.add_argument_group("graph")
    graph.add_argument(
        "--attention-op",
        "--target",
        dest="target",
        choices=("ort", "onnx", "none"),
        default="ort",
        help="ort: com.microsoft.MultiHeadAttention; onnx: ONNX Attention (opset 23); "
        "none: decomposed MatMul/Softmax (opset 18)",
    )
    graph.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    kind = graph.add_mutually_exclusive_group()
    kind.add_argument("--self", dest="self_attention", action="store_true", default=True)
    kind.add_argument("--cross", dest="self_attention", action="store_false")
    graph.add_argument("--causal", action="store_true", help="causal mask (self-attention)")
    graph.add_argument(
        "--kv-cache",
        action="store_true",
        help="export the decoding step graph of causal self-attention (implies --causal): "
        "query, past_key, past_value, key_padding_mask in; output, new_key, new_value out. "
        "With --cross: memory.onnx (key, value -> memory_key, memory_value) and the step "
        "over that memory (query, memory_key, memory_value, key_padding_mask -> output)",
    )
    graph.add_argument(
        "--attention-weights", action="store_true", help="add the attention_weights output"
    )
    graph.add_argument("--max-batch-size", type=int, default=64, help="server limit default")
    graph.add_argument("--max-sequence-length", type=int, default=4096, help="server default")
    add_weight_arguments(parser)


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """Weight sources: seeded default, our safetensors, a BERT-style file, or a Hugging Face
    checkpoint folder."""
    weights = parser.add_argument_group("weights (default: embedded seeded weights)")
    source = weights.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="safetensors written by mha (save())")
    source.add_argument("--bert", type=Path, help="BERT-style safetensors checkpoint")
    source.add_argument(
        "--hf",
        type=Path,
        metavar="DIR",
        help="Hugging Face checkpoint folder (config.json, model.safetensors or its shard "
        "index): GPT-2, BART, mBART, Marian, Whisper, BERT-style; sizes, heads, biases and "
        "causality come from it",
    )
    weights.add_argument("--hf-layer", type=int, default=None, help="layer to take (default 0)")
    weights.add_argument(
        "--hf-attention",
        choices=("self", "cross"),
        default=None,
        help="the layer's self-attention (causal in a decoder; default) or a decoder "
        "layer's encoder-decoder attention",
    )
    weights.add_argument(
        "--hf-stack",
        choices=("encoder", "decoder"),
        default=None,
        help="which stack of an encoder-decoder model (default: decoder)",
    )
    weights.add_argument("--bert-layer", type=int, default=0, help="encoder layer to take")
    weights.add_argument("--d-model", type=int, default=None, help="default 512")
    weights.add_argument(
        "--num-heads", type=int, default=None, help="default 8 (BERT: from config.json)"
    )
    weights.add_argument("--kdim", type=int, default=None, help="key features (cross)")
    weights.add_argument("--vdim", type=int, default=None, help="value features (cross)")
    weights.add_argument("--no-bias", dest="bias", action="store_false")
    weights.add_argument("--seed", type=int, default=0)


def options_from(args: argparse.Namespace):
    """ExportOptions from parsed flags (ValueError on bad combinations)."""
    from mha.export.options import ExportOptions

    check_hf_flags(args)
    heads = args.num_heads
    if heads is None and args.bert is None and args.hf is None:
        heads = 8
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    return ExportOptions(
        repository=args.repository,
        name=args.name,
        version=args.version,
        target=args.target,
        dtype=args.dtype,
        self_attention=args.self_attention,
        causal=args.causal,
        attention_weights=args.attention_weights,
        weights=args.weights,
        bert=args.bert,
        bert_layer=args.bert_layer,
        hf=args.hf,
        hf_layer=args.hf_layer or 0,
        hf_attention=args.hf_attention or "self",
        hf_stack=args.hf_stack,
        d_model=512 if args.d_model is None else args.d_model,
        num_heads=heads,
        kdim=args.kdim,
        vdim=args.vdim,
        bias=args.bias,
        seed=args.seed,
        max_batch_size=args.max_batch_size,
        max_sequence_length=args.max_sequence_length,
        kv_cache=args.kv_cache,
        external_data=external,
    )


def check_hf_flags(args: argparse.Namespace) -> None:
    """ValueError for --hf-* flags without --hf, or flags that the checkpoint decides."""
    if args.hf is None:
        stray = [f for f in HF_CHOICES if getattr(args, f) is not None]
        if stray:
            flags = ", ".join("--" + f.replace("_", "-") for f in stray)
            raise ValueError(f"{flags} choose a layer of a checkpoint: they need --hf DIR")
        return
    given = [flag for flag, dest in SIZE_FLAGS.items() if getattr(args, dest) is not None]
    given += ["--no-bias"] if not args.bias else []
    given += ["--causal"] if args.causal else []
    given += ["--cross (use --hf-attention cross)"] if not args.self_attention else []
    if given:
        raise ValueError(
            "--hf reads sizes, heads, biases, causality and self/cross from the checkpoint: "
            f"drop {', '.join(given)}"
        )


HF_CHOICES = ("hf_layer", "hf_attention", "hf_stack")
SIZE_FLAGS = {
    "--d-model": "d_model",
    "--num-heads": "num_heads",
    "--kdim": "kdim",
    "--vdim": "vdim",
}


def require_export_extra(command: str) -> None:
    """Quiet the exporters' loggers; CliError when the export extra is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        raise CliError(
            f"`{command}` needs the export extra ({err.name} is missing): "
            "pip install 'mha-serve[export]'"
        ) from err
    from mha.export.quiet import drop_torchvision_notices

    # After the imports: importing torch sets its loggers' levels, undoing any set before.
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    drop_torchvision_notices()


def run(args: argparse.Namespace) -> int:
    """Export, validate, write; print progress and the parity report."""
    from mha.export.repository import has_model

    # The flags are checked, and --if-missing answered, before torch is imported (seconds).
    try:
        options = options_from(args)
    except ValueError as err:
        raise CliError(str(err)) from err
    if args.if_missing and has_model(options.model_dir):
        print(f"{options.model_dir} already holds an export; nothing to do (--if-missing)")
        return 0
    require_export_extra("mha export")
    from mha.export import report
    from mha.export.exporter import export_model
    from mha.export.failures import ExportValidationError
    from mha.model.weights import WeightsError

    try:
        result = export_model(options, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except ExportValidationError as err:
        print(f"mha export: {err}", file=sys.stderr)
        return 1
    except (WeightsError, ValueError) as err:
        raise CliError(str(err)) from err
    print(report.parity_table(result))
    print()
    print(report.summary_table([result]))
    print(f"\nwrote {result.model_dir}")
    return 0
