"""export_model: trace, emit one fused attention node, validate, write the repository."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import onnxscript
import torch

from mha import contract
from mha.export import repository, torchlib_registry, validate
from mha.export.cases import parity_cases
from mha.export.decode_cases import decoding_cases
from mha.export.failures import ExportValidationError, ValidationFailure
from mha.export.fused_ops import translation_table
from mha.export.graph import MemoryGraph, MemoryStepGraph, StepGraph, build_graph
from mha.export.memory_cases import memory_cases
from mha.export.onnx_graph import annotate_fused_outputs, drop_unused_outputs, name_io_axes
from mha.export.options import TARGETS, TOLERANCE, ExportOptions
from mha.export.quiet import drop_torchvision_notices
from mha.export.signature import (
    contract_dims,
    dynamic_shapes,
    example_inputs,
    io_shapes,
    memory_dynamic_shapes,
    memory_example_inputs,
    memory_io_shapes,
    step_dynamic_shapes,
    step_example_inputs,
    step_io_shapes,
)
from mha.export.sources import WeightsSource, resolve_source
from mha.export.step_ops import step_translation_table
from mha.export.validate_memory import MemorySessions, check_memory
from mha.export.validate_step import check_decoding
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


@dataclass(frozen=True)
class TraceSpec:
    """What torch.onnx.export is given for one export: the module, its inputs and axes."""

    graph: Any  # ExportGraph or StepGraph: an nn.Module with input_names()/output_names()
    args: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any], ...]
    translation_table: dict
    io_shapes: dict[str, list[str | int]]  # the contract's shapes, written into the graph


def trace_spec(module: MultiHeadAttention, options: ExportOptions) -> TraceSpec:
    """The full-sequence graph, or with options.kv_cache the decoding step graph."""
    dtype, fused = TORCH_DTYPE[options.dtype], bool(TARGETS[options.target].node)
    config = module.config
    if options.memory:
        tensors = (*contract.memory_step_inputs(), *contract.memory_step_outputs())
        return TraceSpec(
            MemoryStepGraph(module, fused).eval(),
            memory_example_inputs(contract.memory_step_inputs(), config, dtype),
            memory_dynamic_shapes(contract.memory_step_inputs(), config),
            translation_table(options.target),
            memory_io_shapes(tensors, config),
        )
    if options.kv_cache:
        module.check_decodable()  # ValueError for weights with kdim or vdim != d_model
        return TraceSpec(
            StepGraph(module, fused).eval(),
            step_example_inputs(config, dtype),
            step_dynamic_shapes(config),
            step_translation_table(options.target, options.step_feed),
            step_io_shapes(config),
        )
    return TraceSpec(
        build_graph(module, options.self_attention, options.attention_weights, fused),
        example_inputs(config, options.self_attention, dtype),
        dynamic_shapes(config, options.self_attention),
        translation_table(options.target),
        io_shapes(config, options.self_attention),
    )


def memory_trace_spec(module: MultiHeadAttention, options: ExportOptions) -> TraceSpec:
    """memory.onnx of a memory export: the K/V projections, no attention."""
    config, inputs = module.config, contract.memory_projection_inputs()
    tensors = (*inputs, *contract.memory_projection_outputs())
    return TraceSpec(
        MemoryGraph(module).eval(),
        memory_example_inputs(inputs, config, TORCH_DTYPE[options.dtype]),
        memory_dynamic_shapes(inputs, config),
        {},
        memory_io_shapes(tensors, config),
    )


def trace(
    source: WeightsSource,
    options: ExportOptions,
    spec_of: Callable[[MultiHeadAttention, ExportOptions], TraceSpec] = trace_spec,
) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with the target's fused-op translation."""
    module = copy.deepcopy(source.module).to(TORCH_DTYPE[options.dtype])
    spec = spec_of(module, options)
    drop_torchvision_notices()
    with warnings.catch_warnings(), torchlib_registry.reused():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.graph,
            spec.args,
            input_names=spec.graph.input_names(),
            output_names=spec.graph.output_names(),
            opset_version=TARGETS[options.target].opset,
            dynamo=True,
            dynamic_shapes=spec.dynamic_shapes,
            custom_translation_table=spec.translation_table,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    model = program.model_proto
    drop_unused_outputs(model)
    annotate_fused_outputs(model, ELEM_TYPE[options.dtype])
    name_io_axes(model, spec.io_shapes)
    return model


def structure_failures(model: onnx.ModelProto, options: ExportOptions) -> list[ValidationFailure]:
    """onnx.checker, shape inference, names and the fused-node rule."""
    failures = validate.check_onnx(model)
    if options.memory:
        return failures + validate.check_memory_step_structure(model, options.target)
    if options.kv_cache:
        return failures + validate.check_step_structure(model, options.target)
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
    """Input and output specs for mha.json (-1 = dynamic), from the tensor contract.

    A KV-cache export declares what a request carries (B = 1, the query of new tokens);
    its step graph's own tensors are in mha.json's "sequence" object.
    """
    dims = contract_dims(module.config)
    if options.memory:
        return contract.memory_request_specs(dims, options.dtype.upper())
    if options.kv_cache:
        return contract.sequence_request_specs(dims, options.dtype.upper())
    return contract.json_specs(
        dims, options.self_attention, options.attention_weights, options.dtype.upper()
    )


def model_config(options, source, results) -> dict:
    """The mha.json document (docs/architecture.md, "Model repository format")."""
    cfg = source.module.config
    target = TARGETS[options.target]
    inputs, outputs = tensor_specs(options, source.module)
    abs_err, rel_err = validate.max_errors(results)
    config = {
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
    if source.record is not None:
        config["source"] = source.record
    if options.kv_cache:
        dims, dtype = contract_dims(cfg), options.dtype.upper()
        sequence_json = contract.memory_sequence_json if options.memory else contract.sequence_json
        config["sequence"] = sequence_json(dims, dtype, options.max_sequence_length)
    return config


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
        options, source = resolve_source(options, module)
    with timer.step(
        2, f"trace with torch.onnx and emit {TARGETS[options.target].node or 'MatMul/Softmax'}"
    ):
        model = trace(source, options)
        memory = trace(source, options, memory_trace_spec) if options.memory else None
    with timer.step(3, "check graph (onnx.checker, shape inference, fused node)"):
        failures = structure_failures(model, options)
        if memory is not None:
            failures += validate.check_onnx(memory) + validate.check_memory_structure(memory)
    config, results, files = install_validated(model, options, source, failures, timer, memory)
    seconds = time.perf_counter() - start
    return ExportResult(options, options.model_dir, files, config, results, seconds, timer.seconds)


def install_validated(
    model: onnx.ModelProto,
    options: ExportOptions,
    source: WeightsSource,
    failures: list[ValidationFailure],
    timer: StepTimer,
    memory: onnx.ModelProto | None = None,
) -> tuple[dict, list[validate.CaseResult], list[Path]]:
    """Write into a staging folder, check parity there, install only when nothing failed.

    memory: a memory export's memory.onnx, written beside model.onnx. Returns mha.json's
    document, the parity results and the installed files.
    """
    staging = repository.staging_dir(options.model_dir)
    try:
        with timer.step(4, "write model files"):
            config = model_config(options, source, [])
            extra = {contract.MEMORY_FILE: memory} if memory is not None else None
            files = repository.write_version(model, config, staging, options.external_data, extra)
        results = staged_parity(staging, options, source, timer)
        failures = [*failures, *validate.parity_failures(results)]
        if failures:
            raise ExportValidationError(failures)
        config = model_config(options, source, results)
        repository.write_version(model, config, staging, options.external_data, extra)
        repository.install(staging, options.model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return config, results, [options.model_dir / f.name for f in files]


def staged_parity(
    staging: Path, options: ExportOptions, source: WeightsSource, timer: StepTimer
) -> list[validate.CaseResult]:
    """Step 5: the staged model.onnx on ONNX Runtime CPU vs eager, on the parity cases.

    A KV-cache export is checked by decoding (decode_cases.decoding_cases) instead.
    """
    path = str(staging / repository.MODEL_FILE)
    if options.memory:
        checks = memory_cases()
        title = f"memory parity vs eager PyTorch and the cross graph on {len(checks)} cases"
        with timer.step(5, title):
            sessions = memory_sessions(staging, options, source)
            return check_memory(sessions, source.module, options.dtype, checks)
    if options.kv_cache:
        steps = decoding_cases()
        with timer.step(5, f"decoding parity vs eager PyTorch on {len(steps)} cases"):
            session = cpu_session(path)
            return check_decoding(session, source.module, options.dtype, steps)
    cases = parity_cases(options.self_attention)
    with timer.step(5, f"parity vs eager PyTorch on {len(cases)} shapes"):
        session = cpu_session(path)
        return validate.check_parity(
            session, source.module, cases, options.self_attention, options.dtype
        )


def memory_sessions(staging: Path, options: ExportOptions, source: WeightsSource) -> MemorySessions:
    """The staged memory.onnx and model.onnx, and the stateless cross graph of the same
    weights (traced here, not written), on ONNX Runtime CPU."""
    cross = trace(source, dataclasses.replace(options, kv_cache=False))
    return MemorySessions(
        cpu_session(str(staging / contract.MEMORY_FILE)),
        cpu_session(str(staging / repository.MODEL_FILE)),
        cpu_session(cross.SerializeToString()),
    )


def cpu_session(model: str | bytes) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of a model file or serialized model, for the parity cases.

    One thread that does not spin: the cases are small, and a pool of spinning threads only
    burns the cores that other exports (tests, CI) run on.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class StepTimer:
    """Announce numbered steps and time them."""

    def __init__(self, say: Progress) -> None:
        self.say = say
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, number: int, title: str) -> Iterator[None]:
        """Announce step `number`, run the body, announce how long it took."""
        self.say(f"[{number}/{STEPS}] {title} ...")
        begin = time.perf_counter()
        yield
        took = time.perf_counter() - begin
        self.seconds[title] = took
        self.say(f"[{number}/{STEPS}] {title}: done in {took:.2f} s")
