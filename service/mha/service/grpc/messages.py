"""Protocol messages <-> the data plane's types (mha.service.core.inference, stats, specs).

The wire's own rules are checked here, because only the wire has them: raw_input_contents
and typed contents never mixed, one raw entry per input, the typed field that matches the
datatype. Everything about the model (names, shapes, limits, values) is the data plane's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.core.inference import (
    InferRequest,
    InferResponse,
    InputTensor,
    Parameter,
    Unreadable,
)
from mha.service.core.repository import ModelSpec
from mha.service.core.stats import Duration, VersionStats
from mha.service.grpc import codec, wire

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models


def parameters(params: object) -> dict[str, Parameter]:
    """A protocol parameters map (name -> InferParameter) as plain values."""
    values: dict[str, Parameter] = {}
    for name, param in params.items():  # type: ignore[attr-defined]
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            values[name] = getattr(param, kind)
    return values


def _contents_problem(request: pb.ModelInferRequest, raw_count: int) -> str | None:
    """What breaks the wire's rules for tensor contents, if anything."""
    typed = [t.name for t in request.inputs if codec.typed_count(t.contents)]
    if raw_count and typed:
        return (
            f"input {typed[0]!r} has typed contents while the request also has "
            f"raw_input_contents; use one or the other for all inputs"
        )
    if raw_count and raw_count != len(request.inputs):
        return (
            f"raw_input_contents has {raw_count} entries, expected one per input "
            f"({len(request.inputs)} inputs)"
        )
    return None


def _typed_input(tensor: pb.ModelInferRequest.InferInputTensor) -> InputTensor:
    """An input sent in typed contents; data Unreadable when the field cannot carry it."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(int(d) for d in tensor.shape)
    present = codec.typed_count(tensor.contents)
    field = codec.PROTOCOL_FIELDS.get(datatype)
    if field is None:
        why = (
            f"{datatype} data must travel in raw_input_contents (the protocol has no typed "
            f"field for it)"
        )
        return InputTensor(name, datatype, shape, Unreadable(why))
    others = sorted(set(present) - {field})
    if others:
        why = f"typed contents in {', '.join(others)}, expected {field} for {datatype}"
        return InputTensor(name, datatype, shape, Unreadable(why))
    return InputTensor(name, datatype, shape, getattr(tensor.contents, field), field)


def infer_request(
    message: pb.ModelInferRequest | wire.SplitRequest,
    timeout: float | None,
    session: Hashable | None = None,
) -> InferRequest:
    """The data plane's request; a breach of the wire's own rules makes it `unreadable`.

    A SplitRequest's raw contents stay views of the received bytes (mha.service.grpc.wire).
    The data plane refuses an unreadable request after the model lookup, so the order of
    checks (and so which error a client sees first) is the same as for any other problem.
    """
    if isinstance(message, wire.SplitRequest):
        raws: Sequence[bytes | memoryview] = message.contents
        message = message.message
    else:
        raws = list(message.raw_input_contents)
    problem = _contents_problem(message, len(raws))
    inputs = []
    if problem is None:
        inputs = [
            InputTensor(t.name, t.datatype, tuple(int(d) for d in t.shape), raws[i])
            if raws
            else _typed_input(t)
            for i, t in enumerate(message.inputs)
        ]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=[o.name for o in message.outputs],
        parameters=parameters(message.parameters),
        timeout=timeout,
        unreadable=problem,
        session=session,
    )


def infer_response_bytes(response: InferResponse, *, streamed: bool = False) -> bytes:
    """The serialized ModelInferResponse, written directly (mha.service.grpc.wire); with
    streamed=True the ModelStreamInferResponse carrying it (ModelStreamInfer)."""
    return wire.infer_response(
        response.model_name, response.model_version, response.id, response.outputs,
        response.parameters, streamed=streamed,
    )  # fmt: skip


def model_metadata(spec: ModelSpec, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    """Tensors from mha.json; key_padding_mask is listed though a request may omit it.

    The protocol's TensorMetadata has no "optional" flag (docs/architecture.md, "The wire").
    """
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def version_statistics(spec: ModelSpec, stats: VersionStats) -> pb.ModelStatistics:
    """One version's ModelStatistics (Triton's semantics: mha.service.core.stats)."""
    return pb.ModelStatistics(
        name=spec.name,
        version=str(spec.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_infer=_duration(stats.compute_infer),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
            for size, d in sorted(stats.batches.items())
        ],
    )
