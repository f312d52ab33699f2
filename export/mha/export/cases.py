"""Parity cases: shapes OTHER than the export shapes, with readable ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mha import contract
from mha.export.signature import contract_dims
from mha.model.config import AttentionConfig

PADDINGS = ("none", "padded", "full")  # full = one sample entirely padded


@dataclass(frozen=True)
class ParityCase:
    """One input shape and padding pattern; S is ignored for self-attention."""

    batch: int
    length: int
    source: int
    padding: str = "none"

    def id(self, self_attention: bool) -> str:
        """Readable id, e.g. B3-L17-S33-padded."""
        s = "" if self_attention else f"-S{self.source}"
        pad = "" if self.padding == "none" else f"-{self.padding}"
        return f"B{self.batch}-L{self.length}{s}{pad}"

    def inputs(
        self, config: AttentionConfig, self_attention: bool, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """fp32 query (and key, value) and the bool key_padding_mask, by graph input name."""
        rng = np.random.default_rng(seed)
        dims, sizes = contract_dims(config), {"B": self.batch, "L": self.length, "S": self.source}
        arrays = {}
        for t in contract.inputs(self_attention):  # in contract order: the rng draws in it
            shape = contract.concrete_shape(t, dims, self_attention, sizes)
            if t.datatype == contract.BOOL:
                arrays[t.name] = self.mask(shape[1], rng)
            else:
                arrays[t.name] = rng.standard_normal(shape).astype(np.float32)
        return arrays

    def mask(self, source: int, rng: np.random.Generator) -> np.ndarray:
        """(B, S) bool, True = padding: right padding to random lengths, or none."""
        mask = np.zeros((self.batch, source), dtype=bool)
        if self.padding == "none":
            return mask
        lengths = rng.integers(1, source + 1, size=self.batch)
        lengths[0] = max(1, source // 2)  # at least one sample is really padded
        for b, n in enumerate(lengths):
            mask[b, n:] = True
        if self.padding == "full":
            mask[-1, :] = True
        return mask


def parity_cases(self_attention: bool) -> list[ParityCase]:
    """The export-time validation set: padded batch, fully padded sample, B=1 L=1, odd sizes."""
    cases = [
        ParityCase(3, 17, 33, "none"),
        ParityCase(3, 17, 33, "padded"),
        ParityCase(4, 9, 6, "full"),
        ParityCase(1, 1, 1, "none"),
        ParityCase(2, 31, 1, "padded"),
        ParityCase(1, 64, 127, "padded"),
    ]
    if self_attention:  # S == L: drop cases that only differ in S
        unique = {c.id(True): c for c in cases}
        return list(unique.values())
    return cases
