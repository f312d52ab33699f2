"""`mha export --hf` models served for real, driven by Triton's client and by `mha infer`.

One server holds GPT-2's layer-1 self-attention as a KV-cache step model, BART's layer-1
encoder-decoder attention as a memory model and all-MiniLM-L6-v2's layer 0 with attention
weights. tritonclient (in a process of its own, as a user's program) decodes three GPT-2
sequences step by step, interleaved on one stream, and steps three BART sequences each over
its padded encoder memory sent once at the start; every answer row must be the row the
transformers model's own attention gave in a full forward over the padded batch.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import RunningServer, run_client_script, settings_for
from hf_models import attention_module, capture, model_inputs

from mha import contract

CLIENT = """
import queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

port, plan_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
plan = dict(np.load(plan_file))  # "<model>|<sequence>|<step>|<input>" -> array
requests = {}
for key in plan:
    model, sequence, step, name = key.split("|")
    requests.setdefault((int(step), model, int(sequence)), []).append(name)
last = {}
for step, model, sequence in requests:
    last[model, sequence] = max(step, last.get((model, sequence), 0))
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
for step, model, sequence in sorted(requests):  # interleaved: step 0 of all, then step 1...
    tensors = []
    for name in sorted(requests[step, model, sequence]):
        array = plan[f"{model}|{sequence}|{step}|{name}"]
        datatype = "BOOL" if array.dtype == bool else "FP32"
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    client.async_stream_infer(model, tensors, request_id=f"{model}|{sequence}|{step}",
                              sequence_id=sequence, sequence_start=step == 0,
                              sequence_end=step == last[model, sequence])
answers = {}
for _ in requests:
    result, error = results.get(timeout=120)
    if error is not None:
        sys.exit(f"error: {error}")
    answers[result.get_response().id] = result.as_numpy("output")
client.stop_stream()
np.savez(out_file, **answers)
"""


@pytest.fixture(scope="module")
def server(tiny_models, minilm_folder, hf_exported, tmp_path_factory):
    models = {
        "gpt2-kv": hf_exported("gpt2-kv", "--hf", tiny_models["gpt2"][0], "--hf-layer", 1,
                               "--kv-cache"),
        "bart-xkv": hf_exported("bart-xkv", "--hf", tiny_models["bart"][0], "--hf-layer", 1,
                                "--hf-attention", "cross", "--kv-cache"),
        "minilm": hf_exported("minilm", "--hf", minilm_folder, "--attention-weights"),
    }  # fmt: skip
    repo = tmp_path_factory.mktemp("hf-serving")
    for name, model_dir in models.items():
        (repo / name).mkdir()
        (repo / name / "1").symlink_to(model_dir, target_is_directory=True)
    running = RunningServer(settings_for(repo, batching=True)).load()
    yield running, models
    running.close()


def gpt2_plan(tiny_models) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Three GPT-2 sequences: a 2-token prompt, then one token a step; and the answers."""
    _, model = tiny_models["gpt2"]
    lengths = [6, 4, 5]
    inputs, _, _ = model_inputs("gpt2", lengths, [3, 3, 3], seed=21)
    captured = capture(model, "gpt2", attention_module(model, "gpt2", "decoder", 1, "self"),
                       **inputs)  # fmt: skip
    plan, want = {}, {}
    for s, n in enumerate(lengths):
        bounds = [0, 2, *range(3, n + 1)]
        for step, (start, end) in enumerate(itertools.pairwise(bounds)):
            plan[f"gpt2-kv|{s + 1}|{step}|query"] = captured.query[s : s + 1, start:end]
            want[f"gpt2-kv|{s + 1}|{step}"] = captured.output[s : s + 1, start:end]
    return plan, want


def bart_plan(tiny_models) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Three BART sequences over encoder memories padded to 6 rows (real: 6, 4, 2), the
    memory and its mask sent with the first query row only; and the answers."""
    _, model = tiny_models["bart"]
    lengths = [3, 5, 2]
    inputs, _, memory_mask = model_inputs("bart", lengths, [6, 4, 2], seed=22)
    hf_module = attention_module(model, "bart", "decoder", 1, "cross")
    captured = capture(model, "bart", hf_module, **inputs)
    plan, want = {}, {}
    for s, n in enumerate(lengths):
        sequence = f"bart-xkv|{s + 11}"
        plan[f"{sequence}|0|key"] = plan[f"{sequence}|0|value"] = captured.memory[s : s + 1]
        plan[f"{sequence}|0|key_padding_mask"] = ~memory_mask[s : s + 1].numpy()
        for step in range(n):
            plan[f"{sequence}|{step}|query"] = captured.query[s : s + 1, step : step + 1]
            want[f"{sequence}|{step}"] = captured.output[s : s + 1, step : step + 1]
    return plan, want


def test_tritonclient_decodes_gpt2_and_steps_bart_over_padded_memories(
    server, tiny_models, tmp_path: Path
) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    running, _ = server
    gpt2, gpt2_want = gpt2_plan(tiny_models)
    bart, bart_want = bart_plan(tiny_models)
    _, answers = run_client_script(CLIENT, running.port, {**gpt2, **bart}, tmp_path)
    want = {**gpt2_want, **bart_want}
    assert sorted(answers) == sorted(want)
    atol = contract.PARITY_TOLERANCE["FP32"][0]
    for key, rows in want.items():
        np.testing.assert_allclose(answers[key], rows, rtol=0, atol=atol, err_msg=key)


SENTENCE = "The cat sat on the mat because it was warm."


def test_infer_text_sends_the_checkpoint_layer_input_and_labels_the_plot(
    server, minilm_folder, tmp_path: Path
) -> None:
    running, models = server
    plot = tmp_path / "heads.png"
    command = [
        sys.executable, "-m", "mha.cli", "infer", "--url", running.url, "--model", "minilm",
        "--text", SENTENCE, "--hf", str(minilm_folder), "--plot", str(plot),
        "--compare", str(models["minilm"]),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tokens = "[CLS] the cat sat on the mat because it was warm . [SEP]"
    assert f"tokens (13): {tokens}" in run.stdout
    assert "query              FP32 [1, 13, 384]" in run.stdout
    assert "attention_weights  FP32 [1, 12, 13, 13]" in run.stdout
    assert "compare output: max abs error" in run.stdout and ": ok" in run.stdout
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ([], "--text needs --hf DIR"),
        (["--hf", "gpt2"], "--text builds the input of bert, bart, mbart checkpoints; "
         "model_type is 'gpt2'"),
        (["--hf", "bert"], "tokenizer.json: no such file"),
    ],
    ids=["no-hf", "gpt2", "no-tokenizer"],
)  # fmt: skip
def test_infer_text_refusals_name_the_problem(tiny_models, capsys, flags, needle) -> None:
    from mha.cli import main

    flags = [str(tiny_models[f][0]) if f in tiny_models else f for f in flags]
    status = main(["infer", "--url", "127.0.0.1:1", "--text", "hi", *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("mha infer: error: ") and needle in err, err
