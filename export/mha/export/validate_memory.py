"""Export-time validation of a cross-attention memory export: memory.onnx then the step.

Each case runs the two graphs as the server does (memory.onnx's outputs are the step's
memory_key / memory_value) and compares against fp32 eager PyTorch: the step's output with
the cross-attention module (module(query, key, value, key_padding_mask)), memory.onnx's
outputs with k_proj / v_proj. Each MemoryCase is also run through the stateless cross
graph of the same weights (`-vs-cross` ids): the cached path must agree with it too.
Comparisons and typed failures are the full-sequence parity's (validate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from mha import contract
from mha.export.failures import RuntimeFailure
from mha.export.memory_cases import MemoryCase, RaggedMemoryCase, memory_cases
from mha.export.options import RTOL, TOLERANCE
from mha.export.validate import (
    CaseResult,
    case_result,
    compare,
    eager_outputs,
    numpy_dtype,
    output_failure,
    reference_module,
)
from mha.export.validate_step import StepRunError
from mha.model.attention import MultiHeadAttention
from mha.model.config import AttentionConfig

MEMORY_OUTPUTS = (contract.OUTPUT, contract.MEMORY_KEY, contract.MEMORY_VALUE)
Rows = dict[str, np.ndarray]


@dataclass(frozen=True)
class MemorySessions:
    """The sessions a memory export is checked with: memory.onnx, model.onnx, and
    optionally the stateless cross graph of the same weights."""

    memory: ort.InferenceSession
    step: ort.InferenceSession
    cross: ort.InferenceSession | None = None


def check_memory(
    sessions: MemorySessions,
    module: MultiHeadAttention,
    dtype: str,
    cases: list[MemoryCase | RaggedMemoryCase] | None = None,
) -> list[CaseResult]:
    """Every case (memory_cases by default) against eager, then against the cross graph.

    The oracle is fp32 eager on the weights as the export stores them, fed the same
    (rounded) inputs as ONNX Runtime, so only the arithmetic is compared.
    """
    if module.config.causal:
        raise ValueError("a memory export is checked against a cross-attention module")
    oracle = reference_module(module, dtype)
    cases = cases or memory_cases()
    results = [check_memory_case(sessions, oracle, c, dtype) for c in cases]
    if sessions.cross is not None:
        plain = [c for c in cases if isinstance(c, MemoryCase)]
        results += [check_against_cross(sessions, oracle.config, c, dtype) for c in plain]
    return results


def check_memory_case(
    sessions: MemorySessions,
    oracle: MultiHeadAttention,
    case: MemoryCase | RaggedMemoryCase,
    dtype: str,
) -> CaseResult:
    """One case: memory.onnx and the step against eager, or the ORT error raised."""
    case_id = case.id if isinstance(case, RaggedMemoryCase) else case.id()
    try:
        if isinstance(case, MemoryCase):
            got, want = batched(sessions, oracle, case, numpy_dtype(dtype))
        else:
            got, want = ragged(sessions, oracle, case, numpy_dtype(dtype))
    except StepRunError as err:
        return CaseResult(case_id, failures=[RuntimeFailure(case_id, str(err))])
    return case_result(case_id, got, want, MEMORY_OUTPUTS, dtype)


def check_against_cross(
    sessions: MemorySessions, config: AttentionConfig, case: MemoryCase, dtype: str
) -> CaseResult:
    """The case's step output against the stateless cross graph's on the same inputs.

    Both are held to the tolerance against eager, so they may differ by twice it (fp16: the
    cross graph's ORT fusions round its projections differently; measured up to 0.8x one
    tolerance). fp32 agrees to the bit on CPU.
    """
    assert sessions.cross is not None
    case_id = f"{case.id()}-vs-cross"
    feeds = rounded(case.inputs(config, False), numpy_dtype(dtype))
    try:
        got = pipeline(sessions, feeds)
        want = run(sessions.cross, (contract.OUTPUT,), feeds)
    except StepRunError as err:
        return CaseResult(case_id, failures=[RuntimeFailure(case_id, str(err))])
    error = compare(contract.OUTPUT, got[contract.OUTPUT], want[contract.OUTPUT],
                    2 * TOLERANCE[dtype], 2 * RTOL[dtype])  # fmt: skip
    failure = output_failure(
        case_id, error, got[contract.OUTPUT], want[contract.OUTPUT], numpy_dtype(dtype)
    )
    return CaseResult(case_id, [error], [failure] if failure else [])


def run(session: ort.InferenceSession, names: tuple[str, ...], feeds: Rows) -> Rows:
    """The named outputs of one session run on the feeds it takes."""
    wanted = {i.name for i in session.get_inputs()}
    try:
        values = session.run(list(names), {k: v for k, v in feeds.items() if k in wanted})
    except Exception as err:  # ORT raises its own Fail/InvalidArgument types
        raise StepRunError(str(err)) from err
    return dict(zip(names, values, strict=True))


def pipeline(sessions: MemorySessions, feeds: Rows) -> Rows:
    """memory.onnx on key / value, then the step on query, its outputs and the mask."""
    memory = run(sessions.memory, (contract.MEMORY_KEY, contract.MEMORY_VALUE), feeds)
    step = run(sessions.step, (contract.OUTPUT,), {**feeds, **memory})
    return {**step, **memory}


def rounded(feeds: Rows, dtype: np.dtype) -> Rows:
    """Float inputs in the export's dtype, as ONNX Runtime gets them; masks unchanged."""
    return {k: v if v.dtype == bool else v.astype(dtype) for k, v in feeds.items()}


def batched(
    sessions: MemorySessions, oracle: MultiHeadAttention, case: MemoryCase, dtype: np.dtype
) -> tuple[Rows, Rows]:
    """The pipeline's rows of one batch and eager's: output (B, T, E), memory (B, S, E)."""
    feeds = rounded(case.inputs(oracle.config, False), dtype)
    f32 = {k: v if v.dtype == bool else v.astype(np.float32) for k, v in feeds.items()}
    want = {contract.OUTPUT: eager_outputs(oracle, f32, False)[contract.OUTPUT]}
    return pipeline(sessions, feeds), {**want, **projected(oracle, f32)}


def projected(oracle: MultiHeadAttention, feeds: Rows) -> Rows:
    """Eager key W^K + b^K and value W^V + b^V of the feeds' key and value."""
    key, value = (torch.from_numpy(feeds[n]) for n in (contract.KEY, contract.VALUE))
    with torch.no_grad():
        memory = oracle.project_memory(key, value)
    return {contract.MEMORY_KEY: memory.key.numpy(), contract.MEMORY_VALUE: memory.value.numpy()}


def ragged(
    sessions: MemorySessions, oracle: MultiHeadAttention, case: RaggedMemoryCase, dtype: np.dtype
) -> tuple[Rows, Rows]:
    """The real rows of one padded batch, and each sequence run alone through eager.

    Rows compared: the real query rows and memory rows of every sequence, and every output
    row of a sequence with an all-padding memory (each must be zero).
    """
    sequences = [tuple(a.astype(dtype) for a in seq) for seq in case.sequences(oracle.config)]
    step = pipeline(sessions, padded_feeds(case, sequences, dtype))
    got: dict[str, list[np.ndarray]] = {n: [] for n in MEMORY_OUTPUTS}
    want: dict[str, list[np.ndarray]] = {n: [] for n in MEMORY_OUTPUTS}
    for b, (query, key, value) in enumerate(sequences):
        if not len(key):  # all padding: every row zero
            got[contract.OUTPUT].append(step[contract.OUTPUT][b])
            want[contract.OUTPUT].append(np.zeros(step[contract.OUTPUT][b].shape, np.float32))
            continue
        alone = alone_rows(oracle, query, key, value)
        got[contract.OUTPUT].append(step[contract.OUTPUT][b, : len(query)])
        for n in (contract.MEMORY_KEY, contract.MEMORY_VALUE):
            got[n].append(step[n][b, : len(key)])
        for n in MEMORY_OUTPUTS:
            want[n].append(alone[n])
    return join(got), join(want)


def join(rows: dict[str, list[np.ndarray]]) -> Rows:
    """Per output, its row blocks (N_b, E) joined into one (N, E)."""
    return {n: np.concatenate(blocks, axis=0) for n, blocks in rows.items()}


def padded_feeds(
    case: RaggedMemoryCase, sequences: list[tuple[np.ndarray, ...]], dtype: np.dtype
) -> Rows:
    """The inputs of a ragged batch, right-padded with zeros (the mask says where)."""
    (s, t), batch = case.sizes, len(sequences)
    query, key, value = sequences[0]
    feeds = {
        contract.QUERY: np.zeros((batch, t, query.shape[1]), dtype),  # (B, T, E)
        contract.KEY: np.zeros((batch, s, key.shape[1]), dtype),  # (B, S, kdim)
        contract.VALUE: np.zeros((batch, s, value.shape[1]), dtype),  # (B, S, vdim)
        contract.KEY_PADDING_MASK: case.mask(),
    }
    for b, arrays in enumerate(sequences):
        for name, rows in zip((contract.QUERY, contract.KEY, contract.VALUE), arrays, strict=True):
            feeds[name][b, : len(rows)] = rows
    return feeds


def alone_rows(
    oracle: MultiHeadAttention, query: np.ndarray, key: np.ndarray, value: np.ndarray
) -> Rows:
    """Eager cross-attention of one sequence, unpadded: output (T_b, E), memory (S_b, E)."""
    f32 = {
        contract.QUERY: query.astype(np.float32)[None],
        contract.KEY: key.astype(np.float32)[None],
        contract.VALUE: value.astype(np.float32)[None],
        contract.KEY_PADDING_MASK: np.zeros((1, len(key)), bool),
    }
    rows = {contract.OUTPUT: eager_outputs(oracle, f32, False)[contract.OUTPUT]}
    return {n: a[0] for n, a in {**rows, **projected(oracle, f32)}.items()}
