"""Validation cases of a cross-attention memory export: memories of several S, ragged batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mha.export.cases import ParityCase
from mha.model.config import AttentionConfig


@dataclass(frozen=True)
class MemoryCase(ParityCase):
    """B sequences, each a memory of S (key, value) rows and T query tokens; `length` is T.

    padding as ParityCase: "padded" masks memory rows beyond random lengths, "full" masks a
    whole sample's memory (its rows may attend no key and must come out zero).
    """

    def id(self, self_attention: bool = False) -> str:
        """Readable id, e.g. memory-B3-S33-T4-full."""
        pad = "" if self.padding == "none" else f"-{self.padding}"
        return f"memory-B{self.batch}-S{self.source}-T{self.length}{pad}"


@dataclass(frozen=True)
class RaggedMemoryCase:
    """One batched step of sequences with their own memory and query lengths (S_b, T_b).

    Padded as the step graph's contract says: memories to the longest S with the mask True
    beyond S_b, queries to the longest T. A sequence with S_b = 0 has an all-padding memory:
    all its rows must be zero.
    """

    sources: tuple[int, ...]
    new: tuple[int, ...]

    @property
    def id(self) -> str:
        """Readable id, e.g. memory-ragged-B3, or memory-ragged-B2-empty."""
        empty = "-empty" if 0 in self.sources else ""
        return f"memory-ragged-B{len(self.sources)}{empty}"

    @property
    def sizes(self) -> tuple[int, int]:
        """(S, T) of the padded step: the longest memory and the longest query run."""
        return max(self.sources), max(self.new)

    def sequences(self, config: AttentionConfig, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
        """Per sequence, fp32 query (T_b, E), key (S_b, kdim) and value (S_b, vdim)."""
        rng = np.random.default_rng(seed)
        widths = (config.d_model, config.key_dim, config.value_dim)
        return [
            tuple(
                rng.standard_normal((n, w)).astype(np.float32)
                for n, w in zip((t, s, s), widths, strict=True)
            )
            for s, t in zip(self.sources, self.new, strict=True)
        ]

    def mask(self) -> np.ndarray:
        """(B, S) bool, True = padding: the memory slots beyond S_b."""
        mask = np.ones((len(self.sources), self.sizes[0]), dtype=bool)
        for b, s in enumerate(self.sources):
            mask[b, :s] = False
        return mask


def memory_cases() -> list[MemoryCase | RaggedMemoryCase]:
    """The export-time validation set of a memory export: S = 1, 7, 33; T = 1, 4; padded
    memories, fully padded samples, and two ragged batches."""
    return [
        MemoryCase(2, 1, 1),
        MemoryCase(1, 4, 1),
        MemoryCase(2, 4, 7, "padded"),
        MemoryCase(2, 1, 7, "full"),
        MemoryCase(3, 1, 33, "padded"),
        MemoryCase(3, 4, 33, "full"),
        RaggedMemoryCase(sources=(7, 33, 1), new=(4, 1, 2)),
        RaggedMemoryCase(sources=(5, 0), new=(2, 3)),
    ]
