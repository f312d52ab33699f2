"""The data plane's requests and answers as link frames, their tensors as arena slots.

A raw input (bytes or a view of the received message) is copied once, into the frontend's
arena; the engine reads it as a view there (no copy) until it answers. An answer's arrays
are copied once into the engine's arena; the frontend encodes the gRPC answer from views of
them and then releases the slots. Typed contents (the protocol's slow path) and the wire's
refusals travel in the frame itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np

from mha.service.core import errors
from mha.service.core.errors import ServiceError, Status
from mha.service.core.inference import InferRequest, InferResponse, InputTensor, Unreadable
from mha.service.core.stats import Duration, VersionStats
from mha.service.frontends.arena import Arena
from mha.service.frontends.link import Frame

Slot = tuple[int, int]  # offset, length

_ERRORS: dict[Status, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument, errors.NotFound, errors.Unavailable, errors.ResourceExhausted,
        errors.DeadlineExceeded, errors.OutOfRange, errors.Cancelled,
    )
}  # fmt: skip


async def request_frame(
    number: int, request: InferRequest, arena: Arena
) -> tuple[Frame, list[Slot]]:
    """The infer frame of a request (its raw inputs placed in `arena`) and the slots used."""
    slots: list[Slot] = []
    inputs = []
    for tensor in request.inputs:
        data = tensor.data
        if isinstance(data, Unreadable):
            payload: list[Any] = ["unreadable", data.reason]
        elif isinstance(data, bytes | memoryview | np.ndarray):
            raw = data.data if isinstance(data, np.ndarray) else data
            offset = await arena.place(raw)
            slots.append((offset, len(memoryview(raw).cast("B"))))
            payload = ["raw", *slots[-1]]
        else:  # typed values in order (JSON keeps NaN and Inf, which validation refuses)
            payload = ["typed", list(data)]
        inputs.append([tensor.name, tensor.datatype, list(tensor.shape), tensor.source, payload])
    frame = {
        "t": "infer", "n": number, "model": request.model_name,
        "version": request.model_version, "id": request.id, "inputs": inputs,
        "outputs": list(request.outputs), "parameters": dict(request.parameters),
        "timeout": request.timeout, "received": request.received,
        "unreadable": request.unreadable,
        "session": None if request.session is None else str(request.session),
    }  # fmt: skip
    return frame, slots


def request_from(frame: Frame, arena: Arena, frontend: int) -> InferRequest:
    """The engine's InferRequest of an infer frame; raw inputs are views of `arena`."""
    inputs = []
    for name, datatype, shape, source, payload in frame["inputs"]:
        kind, *rest = payload
        data: Any
        if kind == "raw":
            data = arena.read(*rest)
        elif kind == "typed":
            data = rest[0]
        else:
            data = Unreadable(rest[0])
        inputs.append(InputTensor(name, datatype, tuple(shape), data, source))
    session = frame["session"]
    return InferRequest(
        model_name=frame["model"], model_version=frame["version"], id=frame["id"],
        inputs=inputs, outputs=frame["outputs"], parameters=frame["parameters"],
        timeout=frame["timeout"], received=frame["received"], unreadable=frame["unreadable"],
        session=None if session is None else (frontend, session),
    )  # fmt: skip


async def answer_frame(number: int, response: InferResponse, arena: Arena) -> Frame:
    """The answer frame of a response, its outputs copied into `arena`."""
    outputs = []
    for name, array in response.outputs.items():
        data = np.ascontiguousarray(array)
        offset = await arena.place(data.data)
        outputs.append([name, data.dtype.str, list(data.shape), offset, data.nbytes])
    return {
        "t": "answer", "n": number, "model": response.model_name,
        "version": response.model_version, "id": response.id, "outputs": outputs,
        "parameters": response.parameters, "queue_ns": response.queue_ns,
        "compute_ns": response.compute_ns, "batch_size": response.batch_size,
    }  # fmt: skip


def response_from(frame: Frame, arena: Arena) -> tuple[InferResponse, list[Slot]]:
    """The InferResponse of an answer frame (outputs are views of `arena`), and its slots."""
    outputs, slots = {}, []
    for name, dtype, shape, offset, length in frame["outputs"]:
        view = arena.read(offset, length)
        outputs[name] = np.frombuffer(view, dtype=np.dtype(dtype)).reshape(shape)
        slots.append((offset, length))
    response = InferResponse(
        model_name=frame["model"], model_version=frame["version"], id=frame["id"],
        outputs=outputs, parameters=frame["parameters"], queue_ns=frame["queue_ns"],
        compute_ns=frame["compute_ns"], batch_size=frame["batch_size"],
    )  # fmt: skip
    return response, slots


def error_frame(number: int, err: ServiceError | None) -> Frame:
    """A refusal (None: something unexpected, INTERNAL, details in the engine's log)."""
    if err is None:
        return {"t": "error", "n": number, "code": Status.INTERNAL.name}
    return {"t": "error", "n": number, "code": err.code.name, "message": err.message,
            "reason": err.reason}  # fmt: skip


def error_from(frame: Frame) -> Exception:
    """The exception the frontend raises for an error frame, as the data plane raised it."""
    kind = _ERRORS.get(Status[frame["code"]])
    if kind is None:
        return RuntimeError("the engine failed unexpectedly; its log has the details")
    return kind(frame["message"], reason=frame["reason"])


def _fields(stats: VersionStats) -> dict[str, Any]:
    # Not dataclasses.asdict: it cannot rebuild `batches`, a defaultdict (CPython gh-79721).
    return {
        "success": asdict(stats.success), "fail": asdict(stats.fail),
        "queue": asdict(stats.queue), "compute_infer": asdict(stats.compute_infer),
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "last_inference_ms": stats.last_inference_ms,
        "batches": {size: asdict(d) for size, d in stats.batches.items()},
    }  # fmt: skip


def statistics_frame(number: int, figures: Iterable[tuple[str, int, VersionStats]]) -> Frame:
    rows = [[name, version, _fields(stats)] for name, version, stats in figures]
    return {"t": "stats", "n": number, "figures": rows}


def statistics_from(frame: Frame) -> list[tuple[str, int, VersionStats]]:
    rows = []
    for name, version, fields in frame["figures"]:
        stats = VersionStats(
            success=Duration(**fields["success"]), fail=Duration(**fields["fail"]),
            queue=Duration(**fields["queue"]), compute_infer=Duration(**fields["compute_infer"]),
            inference_count=fields["inference_count"],
            execution_count=fields["execution_count"],
            last_inference_ms=fields["last_inference_ms"],
        )  # fmt: skip
        stats.batches.update({int(k): Duration(**v) for k, v in fields["batches"].items()})
        rows.append((name, version, stats))
    return rows
