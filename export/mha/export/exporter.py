"""export_model: trace, emit one fused attention node, validate, write the repository."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import onnxscript
import torch

from mha.export import repository, validate
from mha.export.cases import parity_cases
from mha.export.fused_ops import translation_table
from mha.export.graph import build_graph
from mha.export.onnx_graph import annotate_fused_outputs, drop_unused_outputs, name_io_axes
from mha.export.options import EXPORT_SHAPE, TARGETS, TOLERANCE, ExportOptions
from mha.export.sources import WeightsSource, from_module, load_source
from mha.model.attention import MultiHeadAttention

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
STEPS = 5
ELEM_TYPE = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class ExportResult:
    """What an export wrote and how well it matched eager PyTorch."""

    options: ExportOptions
    model_dir: Path
    files: list[Path]
    config: dict
    results: list[validate.CaseResult]
    seconds: float
    step_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())


def example_inputs(module: MultiHeadAttention, self_attention: bool, dtype: torch.dtype):
    """Trace-time inputs of EXPORT_SHAPE (never used for parity)."""
    b, length, source = EXPORT_SHAPE["B"], EXPORT_SHAPE["L"], EXPORT_SHAPE["S"]
    cfg = module.config
    query = torch.randn(b, length, cfg.d_model, dtype=dtype)
    if self_attention:
        return (query, torch.zeros(b, length, dtype=torch.bool))
    key = torch.randn(b, source, cfg.key_dim, dtype=dtype)
    value = torch.randn(b, source, cfg.value_dim, dtype=dtype)
    return (query, key, value, torch.zeros(b, source, dtype=torch.bool))


def dynamic_shapes(self_attention: bool) -> tuple:
    """Named dynamic axes: B, L and S independent (S is L in self-attention)."""
    batch, length, source = (torch.export.Dim(n) for n in ("B", "L", "S"))
    if self_attention:
        return ({0: batch, 1: length}, {0: batch, 1: length})
    seq = {0: batch, 1: source}
    return ({0: batch, 1: length}, seq, seq, seq)


def trace(source: WeightsSource, options: ExportOptions) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with the target's fused-op translation."""
    module = copy.deepcopy(source.module).to(TORCH_DTYPE[options.dtype])
    target = TARGETS[options.target]
    graph = build_graph(
        module, options.self_attention, options.attention_weights, bool(target.node)
    )
    args = example_inputs(module, options.self_attention, TORCH_DTYPE[options.dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            args,
            input_names=graph.input_names(),
            output_names=graph.output_names(),
            opset_version=target.opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(options.self_attention),
            custom_translation_table=translation_table(options.target),
            optimize=True,
            verbose=False,
        )
    assert program is not None
    model = program.model_proto
    drop_unused_outputs(model)
    annotate_fused_outputs(model, ELEM_TYPE[options.dtype])
    name_io_axes(model, io_shapes(source.module, options.self_attention))
    return model


def io_shapes(module: MultiHeadAttention, self_attention: bool) -> dict[str, list[str | int]]:
    """The contract's shapes with named dynamic axes."""
    cfg, s = module.config, "L" if self_attention else "S"
    return {
        "query": ["B", "L", cfg.d_model],
        "key": ["B", "S", cfg.key_dim],
        "value": ["B", "S", cfg.value_dim],
        "key_padding_mask": ["B", s],
        "output": ["B", "L", cfg.d_model],
        "attention_weights": ["B", cfg.num_heads, "L", s],
    }


def structure_failures(model: onnx.ModelProto, options: ExportOptions) -> list[str]:
    """onnx.checker, shape inference, names and the fused-node rule."""
    failures = validate.check_onnx(model)
    return failures + validate.check_structure(
        model, options.target, options.self_attention, options.attention_weights
    )


def versions() -> dict[str, str]:
    """Library versions recorded with the export."""
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
    }


def tensor_specs(options: ExportOptions, module: MultiHeadAttention) -> tuple[list, list]:
    """Input and output specs for mha.json (-1 = dynamic)."""
    cfg, dt = module.config, options.dtype.upper()
    inputs = [{"name": "query", "datatype": dt, "shape": [-1, -1, cfg.d_model]}]
    if not options.self_attention:
        inputs.append({"name": "key", "datatype": dt, "shape": [-1, -1, cfg.key_dim]})
        inputs.append({"name": "value", "datatype": dt, "shape": [-1, -1, cfg.value_dim]})
    mask = {"name": "key_padding_mask", "datatype": "BOOL", "shape": [-1, -1], "optional": True}
    outputs = [{"name": "output", "datatype": dt, "shape": [-1, -1, cfg.d_model]}]
    if options.attention_weights:
        shape = [-1, cfg.num_heads, -1, -1]
        outputs.append({"name": "attention_weights", "datatype": dt, "shape": shape})
    return [*inputs, mask], outputs


def model_config(options, source, results) -> dict:
    """The mha.json document (DEVELOPERS.md, format 1)."""
    cfg = source.module.config
    target = TARGETS[options.target]
    inputs, outputs = tensor_specs(options, source.module)
    abs_err, rel_err = validate.max_errors(results)
    return {
        "format": 1,
        "name": options.name,
        "version": options.version,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "kdim": cfg.key_dim,
        "vdim": cfg.value_dim,
        "bias": cfg.bias,
        "self_attention": options.self_attention,
        "causal": options.causal,
        "target": options.target,
        "node": target.node or "none",
        "opset": target.opset,
        "dtype": options.dtype.upper(),
        "attention_weights": options.attention_weights,
        "inputs": inputs,
        "outputs": outputs,
        "max_batch_size": options.max_batch_size,
        "max_sequence_length": options.max_sequence_length,
        "versions": versions(),
        "parity": {
            "cases": [r.case_id for r in results],
            "atol": TOLERANCE[options.dtype],
            "max_abs_error": abs_err,
            "max_rel_error": rel_err,
            "reference": "fp32 eager PyTorch",
        },
        "weights_source": source.description,
        "weights_sha256": source.sha256,
    }


def export_model(
    options: ExportOptions,
    module: MultiHeadAttention | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export, validate (always) and install one model version; raise on any failure.

    Raises:
        ExportValidationError: listing every structural and parity failure; nothing is
            written into the repository then.
    """
    say = progress or (lambda message: log.info("%s", message))
    timer = StepTimer(say)
    start = time.perf_counter()
    with timer.step(1, "load weights"):
        source = (
            from_module(module, options.causal)
            if module is not None
            else load_source(options, options.causal)
        )
    with timer.step(
        2, f"trace with torch.onnx and emit {TARGETS[options.target].node or 'MatMul/Softmax'}"
    ):
        model = trace(source, options)
    with timer.step(3, "check graph (onnx.checker, shape inference, fused node)"):
        failures = structure_failures(model, options)
    staging = repository.staging_dir(options.model_dir)
    try:
        with timer.step(4, "write model files"):
            config = model_config(options, source, [])
            files = repository.write_version(model, config, staging, options.external_data)
        cases = parity_cases(options.self_attention)
        with timer.step(5, f"parity vs eager PyTorch on {len(cases)} shapes"):
            session = ort.InferenceSession(
                str(staging / repository.MODEL_FILE), providers=["CPUExecutionProvider"]
            )
            results = validate.check_parity(
                session, source.module, cases, options.self_attention, options.dtype
            )
        failures += validate.parity_failures(results)
        if failures:
            raise validate.ExportValidationError(failures)
        config = model_config(options, source, results)
        files = repository.write_version(model, config, staging, options.external_data)
        repository.install(staging, options.model_dir)
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    final_files = [options.model_dir / f.name for f in files]
    return ExportResult(
        options,
        options.model_dir,
        final_files,
        config,
        results,
        time.perf_counter() - start,
        timer.seconds,
    )


class StepTimer:
    """Announce numbered steps and time them."""

    def __init__(self, say: Progress) -> None:
        self.say = say
        self.seconds: dict[str, float] = {}

    def step(self, number: int, title: str):
        import contextlib

        @contextlib.contextmanager
        def run():
            self.say(f"[{number}/{STEPS}] {title} ...")
            begin = time.perf_counter()
            yield
            took = time.perf_counter() - begin
            self.seconds[title] = took
            self.say(f"[{number}/{STEPS}] {title}: done in {took:.2f} s")

        return run()
