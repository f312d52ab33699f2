"""Triton's Python gRPC client, unchanged, against this server.

The Triton client runs in a process of its own, as a user's program would, so nothing of
mha is imported beside it. (The two can share a process too: mha.proto keeps its descriptors
in a private pool; tests/service/test_proto.py checks that.)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from service_helpers import RunningServer, random_inputs

from mha.service.grpc import codec

CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, arrays_file = sys.argv[1], sys.argv[2]
arrays = dict(np.load(arrays_file))
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
          "model_ready": client.is_model_ready("cross")}
metadata = client.get_model_metadata("cross")
report["platform"] = metadata.platform
report["inputs"] = [t.name for t in metadata.inputs]
inputs = []
for name in ("query", "key", "value", "key_padding_mask"):
    array = arrays[name]
    datatype = "BOOL" if array.dtype == bool else "FP32"
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    inputs.append(tensor)
result = client.infer("cross", inputs, outputs=[grpcclient.InferRequestedOutput("output")],
                      request_id="triton-1")
report["id"] = result.get_response().id
np.save(arrays_file.replace(".npz", "-output.npy"), result.as_numpy("output"))
report["stats"] = client.get_inference_statistics("cross", as_json=True)
client.close()
print(json.dumps(report))
"""


def test_tritonclient_round_trip(running: RunningServer, tmp_path):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    arrays = random_inputs("cross", batch=2, length=6, source=9, seed=11)
    np.savez(tmp_path / "inputs.npz", **arrays)
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(running.port), str(tmp_path / "inputs.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["platform"] == "onnxruntime_onnx"
    assert report["inputs"] == ["query", "key", "value", "key_padding_mask"]
    assert report["id"] == "triton-1"
    ours = codec.response_arrays(running.stub.ModelInfer(codec.infer_request("cross", arrays)))
    np.testing.assert_array_equal(np.load(tmp_path / "inputs-output.npy"), ours["output"])
    [stats] = report["stats"]["model_stats"]
    assert stats["name"] == "cross" and stats["version"] == "1"
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
