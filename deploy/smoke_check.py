"""Check a running `mha serve` from outside its container: health, then one inference.

Used by deploy/smoke.sh. `wait` polls grpc.health.v1 until readiness is SERVING and prints
every health service's status; `draining` polls until readiness is NOT_SERVING while liveness
stays SERVING (after SIGTERM); `health` prints them once; `metrics` fetches
the Prometheus endpoint; `infer` sends one request without the `mha infer` command (for trees
where it does not exist yet), built with mha.service.grpc.codec.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.grpc import codec

# The readiness names and the liveness name fixed in DEVELOPERS.md.
HEALTH_SERVICES = ("", "inference.GRPCInferenceService", "liveness")


def health(stub: health_pb2_grpc.HealthStub, service: str) -> str:
    """The status name of one health service, or the RPC error's code name."""
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as err:
        return err.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def poll(target: str, timeout_s: float, want_ready: bool, pause_s: float) -> dict[str, str] | None:
    """Poll every health service until readiness is (want_ready) or is not SERVING; print
    and return the statuses then, or None after timeout_s."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            statuses = {name: health(stub, name) for name in HEALTH_SERVICES}
            if (statuses["inference.GRPCInferenceService"] == "SERVING") == want_ready:
                break
            if time.monotonic() > deadline:
                state = "not ready" if want_ready else "still ready"
                print(f"{state} after {timeout_s:.0f} s: {statuses}", file=sys.stderr)
                return None
            time.sleep(pause_s)
    for name, status in statuses.items():
        print(f"health {name or '(server)'!r}: {status}")
    return statuses


def wait(target: str, timeout_s: float) -> int:
    """Poll until readiness is SERVING; print each service's status; 0 on success."""
    return 0 if poll(target, timeout_s, want_ready=True, pause_s=0.5) is not None else 1


def draining(target: str, timeout_s: float) -> int:
    """Poll until readiness leaves SERVING (a drain); 0 when liveness still answers SERVING."""
    statuses = poll(target, timeout_s, want_ready=False, pause_s=0.1)
    if statuses is None:
        return 1
    ready = statuses["inference.GRPCInferenceService"]
    return 0 if ready == "NOT_SERVING" and statuses["liveness"] == "SERVING" else 1


def show(target: str) -> int:
    """Print each health service's status once; 0 when the liveness service answers."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = {name: health(stub, name) for name in HEALTH_SERVICES}
    for name, status in statuses.items():
        print(f"health {name or '(server)'!r}: {status}")
    return 0 if statuses["liveness"] == "SERVING" else 1


def metrics(url: str) -> int:
    """Fetch the Prometheus text and print how many mha_* samples it holds."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples = [line for line in text.splitlines() if line.startswith("mha_")]
    families = sorted({line.split("{")[0].split(" ")[0] for line in samples})
    print(f"metrics {url}: {len(samples)} mha_* samples in {len(families)} series names")
    return 0 if samples else 1


def infer(target: str, model: str, d_model: int) -> int:
    """Send one self-attention request (B=2, L=5) and print the output's shape and stats."""
    query = np.random.default_rng(0).standard_normal((2, 5, d_model), dtype=np.float32)
    request = codec.infer_request(model, {"query": query})
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    output = codec.response_arrays(reply)["output"]
    print(
        f"infer {reply.model_name} v{reply.model_version}: output {output.dtype} "
        f"{list(output.shape)} mean {output.mean():+.6f} finite {bool(np.isfinite(output).all())}"
    )
    return 0 if output.shape == query.shape and np.isfinite(output).all() else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["wait", "draining", "health", "metrics", "infer"])
    parser.add_argument("--target", required=True, help="host:port of the gRPC server, or URL")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--model", default="mha")
    parser.add_argument("--d-model", type=int, default=512)
    args = parser.parse_args(argv)
    if args.check == "wait":
        return wait(args.target, args.timeout)
    if args.check == "draining":
        return draining(args.target, args.timeout)
    if args.check == "health":
        return show(args.target)
    if args.check == "metrics":
        return metrics(args.target)
    return infer(args.target, args.model, args.d_model)


if __name__ == "__main__":
    raise SystemExit(main())
