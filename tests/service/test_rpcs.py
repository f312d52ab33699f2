"""Every RPC of the service, health and reflection, through a real channel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_helpers import RunningServer, random_inputs, settings_for

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.grpc import codec

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_server_live_and_ready(running: RunningServer):
    assert running.stub.ServerLive(pb.ServerLiveRequest()).live
    assert running.stub.ServerReady(pb.ServerReadyRequest()).ready


def test_model_ready(running: RunningServer):
    assert running.stub.ModelReady(pb.ModelReadyRequest(name="self")).ready
    assert running.stub.ModelReady(pb.ModelReadyRequest(name="cross", version="1")).ready
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.ModelReady(pb.ModelReadyRequest(name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details().startswith("model 'nope' not found; this server has: cross,")


def test_server_metadata_names_the_provider(running: RunningServer):
    response = running.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert response.name == "mha-serve" and response.version
    assert list(response.extensions) == ["statistics", "sequence", "device:CPUExecutionProvider"]


def test_model_metadata(running: RunningServer):
    response = running.stub.ModelMetadata(pb.ModelMetadataRequest(name="cross"))
    assert response.name == "cross" and list(response.versions) == ["1"]
    assert response.platform == "onnxruntime_onnx"
    inputs = [(t.name, t.datatype, list(t.shape)) for t in response.inputs]
    assert inputs == [
        ("query", "FP32", [-1, -1, 64]),
        ("key", "FP32", [-1, -1, 64]),
        ("value", "FP32", [-1, -1, 64]),
        ("key_padding_mask", "BOOL", [-1, -1]),
    ]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in response.outputs]
    assert outputs == [
        ("output", "FP32", [-1, -1, 64]),
        ("attention_weights", "FP32", [-1, 4, -1, -1]),
    ]


def test_model_statistics_lists_every_model(running: RunningServer):
    response = running.stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert sorted(s.name for s in response.model_stats) == sorted(
        ["self", "cross", "self_onnx", "cross_onnx", "self_none", "cross_none", "self_fp16"]
    )
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.ModelStatistics(pb.ModelStatisticsRequest(name="cross", version="3"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_infer_response_echoes_id_and_names_the_provider(running: RunningServer):
    request = codec.infer_request("self", random_inputs("self"), request_id="req-17")
    response = running.stub.ModelInfer(request)
    assert (response.id, response.model_name, response.model_version) == ("req-17", "self", "1")
    assert response.parameters["provider"].string_param == "CPUExecutionProvider"


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService", "liveness"])
def test_health_serving(running: RunningServer, service: str):
    health = health_pb2_grpc.HealthStub(running.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING


def test_reflection_lists_the_services(running: RunningServer):
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [response] = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("inference.GRPCInferenceService", "grpc_predict_v2.proto"),
        ("inference.ModelInferRequest", "grpc_predict_v2.proto"),
        ("grpc.health.v1.Health", health_pb2.DESCRIPTOR.name),
    ],
)
def test_reflection_describes_symbols(running: RunningServer, symbol: str, file: str):
    """What grpcurl asks before it can call a method: the file defining a symbol."""
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    [response] = list(stub.ServerReflectionInfo(iter([request])))
    assert not response.HasField("error_response"), response.error_response
    [raw] = response.file_descriptor_response.file_descriptor_proto
    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert proto.name == file


@pytest.fixture(scope="module")
def two_versions(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A repository holding model 'self' as versions 1 and 3 (same files)."""
    root = tmp_path_factory.mktemp("versions")
    (root / "self").mkdir()
    for version in ("1", "3"):
        (root / "self" / version).symlink_to((repository / "self" / "1").resolve())
    server = RunningServer(settings_for(root, reflection=False)).load()
    yield server
    server.close()


def test_versions_latest_by_default(two_versions: RunningServer):
    stub = two_versions.stub
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="self"))
    assert list(metadata.versions) == ["1", "3"]
    inputs = random_inputs("self")
    assert stub.ModelInfer(codec.infer_request("self", inputs)).model_version == "3"
    assert stub.ModelInfer(codec.infer_request("self", inputs, version="1")).model_version == "1"
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="self"))
    assert {s.version: s.inference_stats.success.count for s in stats.model_stats} == {
        "1": 1,
        "3": 1,
    }


def test_reflection_off(two_versions: RunningServer):
    stub = reflection_pb2_grpc.ServerReflectionStub(two_versions.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ServerReflectionInfo(iter([request])))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
