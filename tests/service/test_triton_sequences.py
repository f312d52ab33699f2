"""Triton's Python client decodes sequences unchanged: its stream API and unary calls.

tritonclient runs in a process of its own, as a user's program would; it writes what it got
to a file, and the test compares every step with the full causal forward.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from harness import RunningServer, link_repository, run_client_script, settings_for
from sequence_helpers import FullForward, check_steps

CLIENT = """
import json, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, plan_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
plan = dict(np.load(plan_file))  # "<sequence>-<step>" -> query [1, T, E]
sequences = sorted({k.split("-")[0] for k in plan})
steps = len(plan) // len(sequences)
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")

def tensor(query):
    t = grpcclient.InferInput("query", list(query.shape), "FP32")
    t.set_data_from_numpy(query)
    return [t]

answers, errors = {}, []
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
for step in range(steps):  # interleaved: one step of every sequence, then the next step
    for s in sequences:
        client.async_stream_infer("kv", tensor(plan[f"{s}-{step}"]), request_id=f"{s}-{step}",
                                  sequence_id=int(s), sequence_start=step == 0,
                                  sequence_end=step == steps - 1)
for _ in range(steps * len(sequences)):
    result, error = results.get(timeout=120)
    if error is not None:
        errors.append(str(error))
    else:
        answers["stream-" + result.get_response().id] = result.as_numpy("output")
# a bad request on the stream: an error for it, and the stream goes on
client.async_stream_infer("kv", tensor(plan[sequences[0] + "-0"]), request_id="bad",
                          sequence_id=999)
result, error = results.get(timeout=120)
errors.append(str(error))
client.stop_stream()
for step in range(steps):  # unary calls of one more sequence
    result = client.infer("kv", tensor(plan[f"{sequences[0]}-{step}"]), sequence_id=4242,
                          sequence_start=step == 0, sequence_end=step == steps - 1)
    answers[f"unary-{step}"] = result.as_numpy("output")
np.savez(out_file, **answers)
client.close()
print(json.dumps({"errors": errors}))
"""


@pytest.fixture(scope="module")
def server(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory):
    repo = link_repository(
        tmp_path_factory.mktemp("triton-seq"), exported, {"kv": {"target": "ort", "kv_cache": True}}
    )
    running = RunningServer(settings_for(repo, batching=True)).load()
    yield running, repo
    running.close()


def test_tritonclient_streams_interleaved_sequences(server, tmp_path: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    running, repo = server
    rng = np.random.default_rng(12)
    sizes = [4, 1, 1, 1, 2, 1]
    plan = {
        f"{s}-{step}": rng.standard_normal((1, n, 64)).astype(np.float32)
        for s in range(11, 19)
        for step, n in enumerate(sizes)
    }
    stdout, answers = run_client_script(CLIENT, running.port, plan, tmp_path)
    report = json.loads(stdout)
    [bad] = report["errors"]  # only the deliberate one
    assert "NOT_FOUND: sequence 999 of model 'kv' version 1 is not active" in bad
    oracle = FullForward(repo / "kv" / "1")
    for s in range(11, 19):
        sent = [plan[f"{s}-{step}"] for step in range(len(sizes))]
        check_steps(oracle, sent, [answers[f"stream-{s}-{step}"] for step in range(len(sizes))])
    unary = [plan[f"11-{step}"] for step in range(len(sizes))]
    check_steps(oracle, unary, [answers[f"unary-{step}"] for step in range(len(sizes))])
