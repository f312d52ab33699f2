"""Export-time validation of a KV-cache step graph: decoding on ONNX Runtime vs eager.

Each case drives the step graph as the server does (the rows it returns are appended to the
cache fed to the next step) and compares every output with fp32 eager PyTorch through the
same comparison and typed failures as the full-sequence parity (validate.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from mha import contract
from mha.export.decode_cases import DecodeCase, RaggedCase, decoding_cases
from mha.export.failures import RuntimeFailure
from mha.export.validate import CaseResult, case_result, numpy_dtype, reference_module
from mha.model.attention import MultiHeadAttention
from mha.model.kv_cache import KVCache

STEP_OUTPUTS = tuple(t.name for t in contract.step_outputs())  # output, new_key, new_value
Rows = dict[str, np.ndarray]  # step output name -> rows


class StepRunError(Exception):
    """ONNX Runtime raised while running a step."""


def check_decoding(
    session: ort.InferenceSession,
    module: MultiHeadAttention,
    dtype: str,
    cases: list[DecodeCase | RaggedCase] | None = None,
) -> list[CaseResult]:
    """Every decoding case (decode_cases.decoding_cases by default) against eager.

    The oracle is fp32 eager on the weights as the export stores them, fed the same
    (rounded) tokens and cached rows as ONNX Runtime, so only the arithmetic is compared.
    """
    if not module.config.causal:
        raise ValueError("a KV-cache export is checked against a causal module (causal=True)")
    oracle = reference_module(module, dtype)
    return [check_decoding_case(session, oracle, c, dtype) for c in cases or decoding_cases()]


def check_decoding_case(
    session: ort.InferenceSession,
    oracle: MultiHeadAttention,
    case: DecodeCase | RaggedCase,
    dtype: str,
) -> CaseResult:
    """One case: its outputs against eager's, or the ONNX Runtime error it raised."""
    try:
        if isinstance(case, DecodeCase):
            got, want = decode(session, oracle, case, numpy_dtype(dtype))
        else:
            got, want = ragged_step(session, oracle, case, numpy_dtype(dtype))
    except StepRunError as err:
        return CaseResult(case.id, failures=[RuntimeFailure(case.id, str(err))])
    return case_result(case.id, got, want, STEP_OUTPUTS, dtype)


def run_step(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Rows:
    """One step: output, new_key, new_value (B, T, E)."""
    try:
        return dict(zip(STEP_OUTPUTS, session.run(list(STEP_OUTPUTS), feeds), strict=True))
    except Exception as err:  # ORT raises its own Fail/InvalidArgument types
        raise StepRunError(str(err)) from err


def decode(
    session: ort.InferenceSession, oracle: MultiHeadAttention, case: DecodeCase, dtype: np.dtype
) -> tuple[Rows, Rows]:
    """The case's steps from an empty cache (every output joined over the steps) and the
    full causal forward over all its tokens."""
    tokens = case.tokens(oracle.config).astype(dtype)  # (B, N, E) as ONNX Runtime sees them
    batch, _, e = tokens.shape
    past_key = past_value = np.zeros((batch, 0, e), dtype)  # (B, P, E), P = 0
    steps, start = [], 0
    for length in case.step_lengths():
        feeds = {
            contract.QUERY: tokens[:, start : start + length],  # (B, T, E)
            contract.PAST_KEY: past_key,
            contract.PAST_VALUE: past_value,
            contract.KEY_PADDING_MASK: np.zeros((batch, past_key.shape[1] + length), bool),
        }
        steps.append(run_step(session, feeds))
        past_key = np.concatenate([past_key, steps[-1][contract.NEW_KEY]], axis=1)  # (B, P+T, E)
        past_value = np.concatenate([past_value, steps[-1][contract.NEW_VALUE]], axis=1)
        start += length
    got = {n: np.concatenate([s[n] for s in steps], axis=1) for n in STEP_OUTPUTS}
    return got, full_causal_rows(oracle, tokens.astype(np.float32))


def full_causal_rows(oracle: MultiHeadAttention, tokens: np.ndarray) -> Rows:
    """Eager answers for tokens (B, N, E): the causal forward and the projected keys, values."""
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        out, _ = oracle(x, use_reference=True)
        key, value = oracle.k_proj(x), oracle.v_proj(x)
    return {
        contract.OUTPUT: out.numpy(),
        contract.NEW_KEY: key.numpy(),
        contract.NEW_VALUE: value.numpy(),
    }


def ragged_step(
    session: ort.InferenceSession, oracle: MultiHeadAttention, case: RaggedCase, dtype: np.dtype
) -> tuple[Rows, Rows]:
    """The real rows of one padded batched step, and each sequence's step run alone.

    Rows compared: the real new rows of every sequence, and every output row of an
    all-padding sequence (each must be zero: it may attend no key).
    """
    sequences = [
        (old.astype(dtype), new.astype(dtype)) for old, new in case.sequences(oracle.config)
    ]
    pasts = [projected(oracle, old, dtype) for old, _ in sequences]
    step = run_step(session, padded_feeds(case, pasts, [new for _, new in sequences], dtype))
    got: dict[str, list[np.ndarray]] = {n: [] for n in STEP_OUTPUTS}
    want: dict[str, list[np.ndarray]] = {n: [] for n in STEP_OUTPUTS}
    for b, ((key, value), (_, new)) in enumerate(zip(pasts, sequences, strict=True)):
        if not len(new) and not len(key):  # all padding
            got[contract.OUTPUT].append(step[contract.OUTPUT][b])
            want[contract.OUTPUT].append(np.zeros(step[contract.OUTPUT][b].shape, np.float32))
        elif len(new):
            alone = step_alone(oracle, key, value, new)
            for n in STEP_OUTPUTS:
                got[n].append(step[n][b, : len(new)])
                want[n].append(alone[n])
    return join(got), join(want)


def join(rows: dict[str, list[np.ndarray]]) -> Rows:
    """Per output, its row blocks (T_b, E) joined into one (N, E)."""
    return {n: np.concatenate(blocks, axis=0) for n, blocks in rows.items()}


def projected(
    oracle: MultiHeadAttention, tokens: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """A sequence's cache rows (P_b, E): eager x W^K + b^K and x W^V + b^V, stored in dtype."""
    x = torch.from_numpy(tokens.astype(np.float32))
    with torch.no_grad():
        return oracle.k_proj(x).numpy().astype(dtype), oracle.v_proj(x).numpy().astype(dtype)


def padded_feeds(
    case: RaggedCase,
    pasts: list[tuple[np.ndarray, np.ndarray]],
    news: list[np.ndarray],
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """The step graph's inputs of a ragged batch, right-padded with zeros (the mask says where)."""
    (p, t), e = case.sizes, news[0].shape[1]
    query = np.zeros((len(news), t, e), dtype)  # (B, T, E)
    past_key, past_value = np.zeros((len(news), p, e), dtype), np.zeros((len(news), p, e), dtype)
    for b, ((key, value), new) in enumerate(zip(pasts, news, strict=True)):
        past_key[b, : len(key)], past_value[b, : len(value)] = key, value
        query[b, : len(new)] = new
    return {
        contract.QUERY: query,
        contract.PAST_KEY: past_key,
        contract.PAST_VALUE: past_value,
        contract.KEY_PADDING_MASK: case.mask(),
    }


def step_alone(
    oracle: MultiHeadAttention, key: np.ndarray, value: np.ndarray, new: np.ndarray
) -> Rows:
    """Eager forward_step of one sequence, unpadded: its output and new rows (T_b, E)."""
    f32 = [torch.from_numpy(a.astype(np.float32))[None] for a in (key, value, new)]
    with torch.no_grad():
        out, grown = oracle.forward_step(f32[2], KVCache(f32[0], f32[1]), use_reference=True)
    p = len(key)
    return {
        contract.OUTPUT: out[0].numpy(),
        contract.NEW_KEY: grown.key[0, p:].numpy(),
        contract.NEW_VALUE: grown.value[0, p:].numpy(),
    }
