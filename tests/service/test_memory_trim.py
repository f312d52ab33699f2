"""Freed heap goes back to the system once the server is idle (mha.service.core.memory)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_helpers import RunningServer, settings_for

from mha.service.core import memory
from mha.service.grpc import codec


def test_an_idle_server_trims_what_a_burst_of_large_requests_left(repository: Path):
    if memory._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here")
    server = RunningServer(settings_for(repository, workers=4)).load()
    trimmer = server.server.trimmer
    trimmed = threading.Event()
    run = trimmer.run

    def observed() -> tuple[int, int]:
        figures = run()
        observed.figures = figures  # type: ignore[attr-defined]
        trimmed.set()
        return figures

    trimmer.growth_bytes = 8 * 2**20
    trimmer.baseline = memory.resident_bytes()
    trimmer.run = observed  # type: ignore[method-assign]
    try:
        rng = np.random.default_rng(0)
        query = rng.standard_normal((8, 512, 64)).astype(np.float32)  # 1 MiB a request
        request = codec.infer_request("self", {"query": query})
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: server.stub.ModelInfer(request, timeout=120),
                                    range(8)))  # fmt: skip
        assert all(codec.response_arrays(a)["output"].shape == query.shape for a in answers)
        assert trimmed.wait(120), "no trim after the burst"
        before, after = observed.figures  # type: ignore[attr-defined]
        assert after <= before
        assert trimmer.baseline == after
        server.stub.ModelInfer(request, timeout=120)  # and it serves on
    except grpc.RpcError as err:
        pytest.fail(f"{err.code()}: {err.details()}")
    finally:
        server.close()
