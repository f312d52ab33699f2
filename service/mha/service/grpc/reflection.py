"""Server reflection (what grpcurl asks): our service, health and reflection itself."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from mha.proto import grpc_predict_v2_pb2 as pb

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors reflection serves: ours (kept out of the default pool), health, itself."""
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


def enable(server: Any) -> None:
    """Serve reflection for the inference and health services.

    server: a grpc.aio.Server or what stands in for one (mha.service.grpc.guard.Registrar).
    """
    names = (INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names, pool=reflection_pool())  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
