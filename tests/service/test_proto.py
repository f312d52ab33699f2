"""The committed generated code matches proto/ (`make proto` regenerates it)."""

from __future__ import annotations

import subprocess
import sys


def test_generated_code_has_not_drifted():
    done = subprocess.run(
        [sys.executable, "-m", "mha.service.grpc.protogen", "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_tritonclient_and_mha_proto_load_in_one_process():
    """Both define `inference.*`; ours lives in a private descriptor pool so they coexist."""
    code = (
        "import tritonclient.grpc, tritonclient.grpc.service_pb2 as t\n"
        "from mha.proto import grpc_predict_v2_pb2 as pb\n"
        "from mha.client import Client\n"
        "wire = pb.ModelInferRequest(model_name='m', id='x').SerializeToString()\n"
        "print(t.ModelInferRequest.FromString(wire).id)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "x"
