"""The contestants of `mha bench export` and their inputs.

torch's nn.MultiheadAttention and our eager module on the same weights, and one ONNX Runtime
CPU session per export target. torch and onnxruntime are imported inside the functions, as
the `mha bench` dispatcher imports this module (through mha.export.bench) to read flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha import contract
from mha.export.bench_plot import OURS, TORCH, ort_name

PADDED_FRACTION = 0.25  # the last quarter of the keys of every sample is padding


@dataclass(frozen=True)
class Case:
    """One input: (B, L) self-attention, with or without a key padding mask."""

    batch: int
    length: int
    padded: bool

    @property
    def id(self) -> str:
        return f"B{self.batch}-L{self.length}" + ("-padded" if self.padded else "")

    def inputs(self, d_model: int) -> tuple[np.ndarray, np.ndarray | None]:
        """fp32 query (B, L, E) and the bool (B, L) key_padding_mask (None = no mask)."""
        rng = np.random.default_rng([self.batch, self.length])
        query = rng.standard_normal((self.batch, self.length, d_model)).astype(np.float32)
        if not self.padded:
            return query, None
        mask = np.zeros((self.batch, self.length), dtype=bool)
        mask[:, self.length - int(self.length * PADDED_FRACTION) :] = True
        return query, mask


Call = Callable[[], Any]


@dataclass
class Contestant:
    """A named way to compute the attention output: prepare(query, mask) -> a timed call."""

    name: str
    prepare: Callable[[np.ndarray, np.ndarray | None], Call]
    to_numpy: Callable[[Any], np.ndarray]


def torch_mha(module):
    """torch.nn.MultiheadAttention (batch_first, eval) holding our module's weights."""
    import torch

    cfg = module.config
    theirs = torch.nn.MultiheadAttention(
        cfg.d_model, cfg.num_heads, bias=cfg.bias, batch_first=True
    )
    with torch.no_grad():
        projections = (module.q_proj, module.k_proj, module.v_proj)
        theirs.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        theirs.out_proj.weight.copy_(module.out_proj.weight)
        if cfg.bias:
            theirs.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
            theirs.out_proj.bias.copy_(module.out_proj.bias)
    return theirs.eval()


def torch_contestants(module) -> list[Contestant]:
    """torch's nn.MultiheadAttention (need_weights=False) and our eager module, same weights."""
    import torch

    theirs = torch_mha(module)

    def prepare_theirs(query: np.ndarray, mask: np.ndarray | None) -> Call:
        q, m = torch.from_numpy(query), None if mask is None else torch.from_numpy(mask)
        return lambda: theirs(q, q, q, key_padding_mask=m, need_weights=False)[0]

    def prepare_ours(query: np.ndarray, mask: np.ndarray | None) -> Call:
        q, m = torch.from_numpy(query), None if mask is None else torch.from_numpy(mask)
        return lambda: module(q, key_padding_mask=m)[0]

    return [
        Contestant(TORCH, prepare_theirs, lambda out: out.numpy()),
        Contestant(OURS, prepare_ours, lambda out: out.numpy()),
    ]


def ort_default_options(threads: int):
    """ORT's default session options but the thread count (torch's); not the server's tuned ones."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # sequential execution: no inter-op pool is used
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def ort_contestants(models: dict[str, Path], threads: int) -> list[Contestant]:
    """One ONNX Runtime CPU session per export target."""
    import onnxruntime as ort

    contestants = []
    for target, path in models.items():
        session = ort.InferenceSession(
            str(path), ort_default_options(threads), providers=["CPUExecutionProvider"]
        )

        def prepare(query: np.ndarray, mask: np.ndarray | None, session=session) -> Call:
            # The graph input is always present: "no mask" is all-False, as the server feeds it.
            keep = np.zeros(query.shape[:2], dtype=bool) if mask is None else mask
            feeds = {contract.QUERY: query, contract.KEY_PADDING_MASK: keep}
            return lambda: session.run([contract.OUTPUT], feeds)[0]

        contestants.append(Contestant(ort_name(target), prepare, np.asarray))
    return contestants
