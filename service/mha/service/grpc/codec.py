"""Tensors between numpy and the Open Inference Protocol (KServe v2) wire format.

Only what mha models use travels: FP32, FP16 (raw only: the protocol has no typed field
for it) and BOOL (1 byte per element). Raw contents are flattened row-major bytes,
little-endian, no padding. Request validation (names, ranks, limits) lives in
mha.service.core.validation; this module only converts, on both sides: the server's
messages (mha.service.grpc.messages) and the client (mha.client) use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mha import contract
from mha.proto import grpc_predict_v2_pb2 as pb

# datatype string -> the InferTensorContents field that carries it (FP16 and BF16 have none)
TYPED_FIELDS: dict[str, str] = {"FP32": "fp32_contents", "BOOL": "bool_contents"}
PROTOCOL_FIELDS: dict[str, str] = {
    **TYPED_FIELDS,
    **dict.fromkeys(("INT8", "INT16", "INT32"), "int_contents"),
    "INT64": "int64_contents",
    **dict.fromkeys(("UINT8", "UINT16", "UINT32"), "uint_contents"),
    "UINT64": "uint64_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def to_raw(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes of an array (BOOL as one byte per element)."""
    return np.ascontiguousarray(array, dtype=contract.DTYPES[contract.datatype_of(array)]).tobytes()


def from_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Array of `shape` from raw bytes; the caller has checked the length."""
    array = np.frombuffer(raw, dtype=contract.DTYPES[datatype]).reshape(tuple(shape))
    return array


def from_typed(contents: pb.InferTensorContents, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Array of `shape` from typed contents; the caller has checked the element count."""
    values = getattr(contents, TYPED_FIELDS[datatype])
    return np.asarray(values, dtype=contract.DTYPES[datatype]).reshape(tuple(shape))


def typed_count(contents: pb.InferTensorContents) -> dict[str, int]:
    """Element count per non-empty typed field (to detect wrong or several fields)."""
    return {
        field.name: len(values)
        for field, values in contents.ListFields()
        if field.name.endswith("_contents")
    }


def input_tensor(
    name: str, array: np.ndarray
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """The request tensor header and its raw contents."""
    header = pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=contract.datatype_of(array), shape=list(array.shape)
    )
    return header, to_raw(array)


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    *,
    version: str = "",
    request_id: str = "",
    typed: bool = False,
    parameters: Mapping[str, bool | int | str] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw contents, or typed contents (ValueError for FP16)."""
    if typed:
        untyped = [n for n, a in inputs.items() if contract.datatype_of(a) not in TYPED_FIELDS]
        if untyped:
            raise ValueError(
                f"inputs {untyped} have no typed contents field in the protocol (FP16 travels "
                "raw only); send them raw"
            )
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        header, raw = input_tensor(name, array)
        if typed:
            field = TYPED_FIELDS[header.datatype]
            getattr(header.contents, field).extend(np.asarray(array).ravel().tolist())
        else:
            request.raw_input_contents.append(raw)
        request.inputs.append(header)
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters[key], value)
    return request


def set_parameter(param: pb.InferParameter, value: bool | int | str) -> None:
    """Fill an InferParameter by the value's type (bool before int: a bool is an int)."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    else:
        param.string_param = value


def output_tensor(
    name: str, array: np.ndarray
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    header = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype=contract.datatype_of(array), shape=list(array.shape)
    )
    return header, to_raw(array)


def infer_response(
    model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray]
) -> pb.ModelInferResponse:
    """A ModelInferResponse with raw_output_contents, outputs in the given order."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, array in outputs.items():
        header, raw = output_tensor(name, array)
        response.outputs.append(header)
        response.raw_output_contents.append(raw)
    return response


def response_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output arrays of a response, raw or typed (any OIP server may answer either way)."""
    arrays = {}
    for index, tensor in enumerate(response.outputs):
        if index < len(response.raw_output_contents):
            arrays[tensor.name] = from_raw(
                response.raw_output_contents[index], tensor.datatype, tensor.shape
            )
        else:
            arrays[tensor.name] = from_typed(tensor.contents, tensor.datatype, tensor.shape)
    return arrays
