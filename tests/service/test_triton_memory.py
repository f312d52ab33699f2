"""Triton's Python client, unchanged, steps a cross-attention memory sequence 32 times.

The memory (padded) is sent once with sequence_start, over a stream and over unary calls;
every step must equal the stateless cross-attention export given the whole memory again.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from harness import RunningServer, link_repository, run_client_script, settings_for

from mha import contract

CROSS = {"self_attention": False, "kdim": 48, "vdim": 40}
STEPS = 32

CLIENT = """
import json, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, plan_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
plan = dict(np.load(plan_file))
steps = sum(1 for k in plan if k.startswith("query-"))
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")

def tensors(step):
    names = ["query"] + (["key", "value", "key_padding_mask"] if step == 0 else [])
    out = []
    for name in names:
        array = plan[f"query-{step}"] if name == "query" else plan[name]
        datatype = "BOOL" if array.dtype == bool else "FP32"
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out

answers, errors = {}, []
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
for step in range(steps):
    client.async_stream_infer("xkv", tensors(step), request_id=str(step), sequence_id=61,
                              sequence_start=step == 0, sequence_end=step == steps - 1)
    result, error = results.get(timeout=120)
    if error is not None:
        errors.append(str(error))
    else:
        answers[f"stream-{result.get_response().id}"] = result.as_numpy("output")
client.stop_stream()
for step in range(steps):
    result = client.infer("xkv", tensors(step), sequence_id="unary-62", sequence_start=step == 0,
                          sequence_end=step == steps - 1)
    answers[f"unary-{step}"] = result.as_numpy("output")
np.savez(out_file, **answers)
print(json.dumps({"errors": errors}))
"""


@pytest.fixture(scope="module")
def served(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory):
    models = {
        "xkv": {"target": "ort", "kv_cache": True, **CROSS},
        "cross": {"target": "ort", **CROSS},
    }
    repo = link_repository(tmp_path_factory.mktemp("triton-memory"), exported, models)
    running = RunningServer(settings_for(repo, batching=True)).load()
    yield running, repo
    running.close()


def test_tritonclient_steps_a_padded_memory_32_times(served, tmp_path: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    running, repo = served
    rng = np.random.default_rng(31)
    mask = np.zeros((1, 20), bool)
    mask[0, 15:] = True  # the last 5 memory tokens are padding
    plan = {
        "key": rng.standard_normal((1, 20, 48)).astype(np.float32),
        "value": rng.standard_normal((1, 20, 40)).astype(np.float32),
        "key_padding_mask": mask,
        **{f"query-{s}": rng.standard_normal((1, 1, 64)).astype(np.float32) for s in range(STEPS)},
    }
    stdout, answers = run_client_script(CLIENT, running.port, plan, tmp_path)
    assert json.loads(stdout)["errors"] == []
    session = ort.InferenceSession(
        str(repo / "cross" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    memory = {n: plan[n] for n in ("key", "value", "key_padding_mask")}
    atol = contract.PARITY_TOLERANCE["FP32"][0]
    for step in range(STEPS):
        want = session.run(["output"], {"query": plan[f"query-{step}"], **memory})[0]
        for how in ("stream", "unary"):
            np.testing.assert_allclose(answers[f"{how}-{step}"], want, rtol=0, atol=atol,
                                       err_msg=f"{how} step {step}")  # fmt: skip
