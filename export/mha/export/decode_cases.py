"""Decoding cases of a KV-cache export: a prompt then steps, and one ragged padded step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mha.model.config import AttentionConfig


@dataclass(frozen=True)
class DecodeCase:
    """B sequences decoded through the step graph from an empty cache: a prompt of P tokens,
    `steps` single-token steps, then one step of `chunk` tokens."""

    prompt: int
    steps: int = 3
    chunk: int = 4
    batch: int = 2

    @property
    def id(self) -> str:
        """Readable id, e.g. decode-P7-steps3-T4."""
        return f"decode-P{self.prompt}-steps{self.steps}-T{self.chunk}"

    def step_lengths(self) -> list[int]:
        """Tokens per step: the prompt, the single tokens, the chunk."""
        return [self.prompt, *([1] * self.steps), self.chunk]

    def tokens(self, config: AttentionConfig, seed: int = 0) -> np.ndarray:
        """fp32 (B, N, E), N = every token of every step."""
        rng = np.random.default_rng(seed)
        shape = (self.batch, sum(self.step_lengths()), config.d_model)
        return rng.standard_normal(shape).astype(np.float32)


@dataclass(frozen=True)
class RaggedCase:
    """One batched step of sequences with their own past and new lengths (P_b, T_b).

    Padded as the step graph's contract says: past rows to the longest P, new rows to the
    longest T, key_padding_mask True on every padded slot. A sequence with P_b = T_b = 0 is
    all padding: its rows may attend no key and must come out zero.
    """

    past: tuple[int, ...]
    new: tuple[int, ...]

    @property
    def id(self) -> str:
        """Readable id, e.g. ragged-B3, or ragged-B2-empty with an all-padding sequence."""
        empty = any(p == t == 0 for p, t in zip(self.past, self.new, strict=True))
        return f"ragged-B{len(self.past)}" + ("-empty" if empty else "")

    @property
    def sizes(self) -> tuple[int, int]:
        """(P, T) of the padded step: the longest past and the longest new run."""
        return max(self.past), max(self.new)

    def sequences(self, config: AttentionConfig, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
        """Per sequence, fp32 (P_b, E) past tokens and (T_b, E) new ones."""
        rng = np.random.default_rng(seed)
        e = config.d_model
        return [
            (
                rng.standard_normal((p, e)).astype(np.float32),
                rng.standard_normal((t, e)).astype(np.float32),
            )
            for p, t in zip(self.past, self.new, strict=True)
        ]

    def mask(self) -> np.ndarray:
        """(B, P + T) bool, True = padding: the past slots beyond P_b, the new beyond T_b."""
        p, t = self.sizes
        mask = np.ones((len(self.past), p + t), dtype=bool)
        for b, (past, new) in enumerate(zip(self.past, self.new, strict=True)):
            mask[b, :past] = False
            mask[b, p : p + new] = False
        return mask


def decoding_cases() -> list[DecodeCase | RaggedCase]:
    """The export-time validation set of a KV-cache export: P = 1, 7, 33, and two ragged steps."""
    return [
        DecodeCase(1),
        DecodeCase(7),
        DecodeCase(33),
        RaggedCase(past=(9, 0, 4), new=(1, 3, 2)),
        RaggedCase(past=(5, 0), new=(2, 0)),
    ]
