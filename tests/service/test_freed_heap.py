"""--freed-heap: with `keep`, large requests reuse freed heap instead of faulting in pages.

Real `mha serve --no-compute` processes, one per mode, answer the same requests of 1 MiB in
and 1 MiB out; each process's minor page faults are read from /proc before and after.
"""

from __future__ import annotations

import ctypes.util
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_helpers import start_cli_server

from mha.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from mha.service.core import memory
from mha.service.grpc import codec

REQUESTS = 16
QUERY = (8, 512, 64)  # fp32: 1 MiB, past glibc's first mmap threshold (128 KiB)


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b") ", 1)[1].split()[7])  # minflt, field 10


def faults_per_request(repository: Path, tmp_path: Path, mode: str) -> float:
    process, port = start_cli_server(
        repository, tmp_path, "--no-compute", "--freed-heap", mode, name=mode
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            query = np.random.default_rng(0).standard_normal(QUERY).astype(np.float32)
            request = codec.infer_request("self", {"query": query})
            for _ in range(2):  # the first buffers of this size are fresh in either mode
                stub.ModelInfer(request, timeout=60)
            before = minor_faults(process.pid)
            for _ in range(REQUESTS):
                assert (
                    codec.response_arrays(stub.ModelInfer(request, timeout=60))["output"].shape
                    == QUERY
                )
            return (minor_faults(process.pid) - before) / REQUESTS
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kept_heap_faults_far_fewer_pages_than_glibcs_defaults(repository: Path, tmp_path):
    if memory._libc_function("mallopt", ctypes.c_int, ctypes.c_int) is None:
        pytest.skip("not glibc")
    kept = faults_per_request(repository, tmp_path, "keep")
    returned = faults_per_request(repository, tmp_path, "return")
    # 1 MiB is 256 pages; each request passes through several buffers of that size.
    assert returned > 256, f"glibc's defaults faulted only {returned:.0f} pages a request"
    assert kept < returned / 4, f"keep {kept:.0f} vs return {returned:.0f} faults a request"


def test_the_environments_malloc_variables_win() -> None:
    assert not memory.keep_freed_heap({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert not memory.keep_freed_heap({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"})
