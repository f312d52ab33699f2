"""Ragged merge and split of attention jobs, and the policies that choose who shares a run.

Merge: jobs with different L (query length) and S (key length) are right-padded with zeros
to the longest in the batch, and key_padding_mask is True (= ignore) on every padded key
position, OR-ed with each job's own mask. A real query row therefore attends exactly the
keys it attends when run alone: padded keys get zero weight, and padded query rows (which
only exist to make the tensor rectangular) are dropped at the split. For self-attention
models the query IS the key/value, so L == S per job and one pad serves both roles.

Causal self-attention: right padding is safe. Query row i attends keys j <= i only; padding
adds keys at positions >= L_job, which are after every real row of that job, so the causal
mask already hides them from real rows (and the padding mask hides them again). Left
padding would shift positions and break this; we never left-pad.

A job whose own mask fully pads a sample still gets its all-zero rows: padding only adds
masked keys, so such a sample stays fully padded in the batch.

Split: job j gets output[i0:i1, :L_j] and attention_weights[i0:i1, :, :L_j, :S_j], only the
outputs it asked for (jobs that ask for different outputs never share a run, see
compat_key), so each answer has exactly the shapes of the job served alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mha import contract

MASK = contract.KEY_PADDING_MASK

# Policy names; mha.service.core.batching's docstring has what each does and its trade-off.
POLICIES = ("bucket", "cap", "fifo")


@dataclass(frozen=True)
class Shape:
    """Samples and lengths of one job: B samples of L queries against S keys."""

    B: int
    L: int
    S: int


def shape_of(inputs: Mapping[str, np.ndarray]) -> Shape:
    """Shape of a job from its inputs (the mask is always present: its width is S)."""
    query = inputs[contract.QUERY]
    return Shape(int(query.shape[0]), int(query.shape[1]), int(inputs[MASK].shape[1]))


def compat_key(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple:
    """Jobs merge only when these match: outputs asked, input names, dtypes, trailing dims.

    attention_weights costs B*h*L*S memory, so a job that did not ask for it never rides in
    a run that computes it.
    """
    names = tuple(sorted(inputs))
    layout = tuple((a.dtype.str, a.shape[2:]) for a in (inputs[n] for n in names))
    return (frozenset(outputs), names, layout)


def padding_fraction(shapes: Sequence[Shape], self_attention: bool) -> float:
    """Padded tokens / all tokens of one run over these jobs (0.0 for no jobs)."""
    tally = _Tally(self_attention)
    for shape in shapes:
        tally.add(shape)
    return tally.fraction()


class _Tally:
    """Running token count of a batch being formed, so each candidate costs O(1)."""

    def __init__(self, self_attention: bool) -> None:
        self.self_attention = self_attention
        self.samples = self.max_l = self.max_s = self.real = 0

    def _tokens(self, L: int, S: int) -> int:
        # Self-attention: the query is the key, so one sequence of L tokens per sample.
        return L if self.self_attention else L + S

    def fraction_with(self, shape: Shape | None) -> float:
        samples, max_l, max_s, real = self.samples, self.max_l, self.max_s, self.real
        if shape is not None:
            samples += shape.B
            max_l, max_s = max(max_l, shape.L), max(max_s, shape.S)
            real += shape.B * self._tokens(shape.L, shape.S)
        total = samples * self._tokens(max_l, max_s)
        return 0.0 if total == 0 else (total - real) / total

    def fraction(self) -> float:
        return self.fraction_with(None)

    def add(self, shape: Shape) -> None:
        self.samples += shape.B
        self.max_l, self.max_s = max(self.max_l, shape.L), max(self.max_s, shape.S)
        self.real += shape.B * self._tokens(shape.L, shape.S)


def _bucket(n: int) -> int:
    """Power-of-two length bucket: 1, 2-3, 4-7, 8-15, ..."""
    return n.bit_length()


def select(
    shapes: Sequence[Shape],
    policy: str,
    max_samples: int,
    max_padding_fraction: float,
    self_attention: bool,
) -> list[int]:
    """Indices (into shapes, oldest first) of the jobs for the next run; always includes 0.

    shapes are the queued jobs compatible with the oldest one, in arrival order. The
    oldest always goes (never starve), even alone over max_samples; the others join while
    the run stays within max_samples and, except for "fifo", max_padding_fraction.
    """
    if not shapes:
        return []
    tally = _Tally(self_attention)
    tally.add(shapes[0])
    chosen = [0]
    order = list(range(1, len(shapes)))
    if policy == "bucket":
        anchor = shapes[0]

        def distance(i: int) -> tuple[int, int, int]:
            s = shapes[i]
            gap = abs(_bucket(s.L) - _bucket(anchor.L)) + abs(_bucket(s.S) - _bucket(anchor.S))
            return (gap, abs(s.L - anchor.L) + abs(s.S - anchor.S), i)

        order.sort(key=distance)
    capped = policy != "fifo"
    # Two passes: a job refused early can fit once similar-length jobs have joined and
    # lowered the fraction.
    for _ in range(2):
        refused = []
        for i in order:
            shape = shapes[i]
            if tally.samples + shape.B > max_samples:
                refused.append(i)
                continue
            if capped and tally.fraction_with(shape) > max_padding_fraction:
                refused.append(i)
                continue
            tally.add(shape)
            chosen.append(i)
        if len(refused) == len(order):
            break
        order = refused
    return sorted(chosen)


@dataclass(frozen=True)
class Merged:
    """Feeds for one run over several jobs, and where each job's samples sit in it."""

    feeds: dict[str, np.ndarray]
    spans: list[tuple[int, int]]  # rows [i0, i1) of each job, in job order
    samples: int
    max_l: int
    max_s: int
    scratch: object = None  # buffers the feeds live in, returned by RunShaper.release


def merge(jobs: Sequence[Mapping[str, np.ndarray]]) -> Merged:
    """Right-pad each job's inputs to the longest L and S and stack them on the batch axis."""
    shapes = [shape_of(inputs) for inputs in jobs]
    lengths = {"L": max(s.L for s in shapes), "S": max(s.S for s in shapes)}
    samples = sum(s.B for s in shapes)
    spans, row = [], 0
    for s in shapes:
        spans.append((row, row + s.B))
        row += s.B
    feeds = {}
    for name, first in jobs[0].items():
        # The contract's own axis names (S stays S: a self-attention job has L == S).
        axis = contract.tensor(name).sequence_axis(self_attention=False)
        if axis is None:
            raise ValueError(f"input {name!r} has no sequence axis; cannot pad it")
        width = lengths[axis]
        if name == MASK:
            # True = padding: every position a job does not fill is ignored as a key.
            merged = np.ones((samples, width), dtype=first.dtype)
        else:
            merged = np.zeros((samples, width, *first.shape[2:]), dtype=first.dtype)
        for inputs, (i0, i1) in zip(jobs, spans, strict=True):
            part = inputs[name]
            merged[i0:i1, : part.shape[1]] = part
        feeds[name] = merged
    return Merged(feeds, spans, samples, lengths["L"], lengths["S"])


def split(
    outputs: Mapping[str, np.ndarray],
    jobs: Sequence[Mapping[str, np.ndarray]],
    asked: Sequence[Sequence[str]],
    spans: Sequence[tuple[int, int]],
) -> list[dict[str, np.ndarray]]:
    """Each job's own rows of each output it asked for, cut back to its own L and S."""
    answers = []
    for inputs, names, (i0, i1) in zip(jobs, asked, spans, strict=True):
        shape = shape_of(inputs)
        lengths = {"L": shape.L, "S": shape.S}
        answer = {}
        for name in names:
            axes = contract.tensor(name).padded_axes(self_attention=False)  # after B
            index = (
                slice(i0, i1),
                *(slice(None) if a is None else slice(lengths[a]) for a in axes),
            )
            # A copy when the slice is strided, so the caller gets a plain C-ordered array
            # and the whole batch's buffers can be freed.
            answer[name] = np.ascontiguousarray(outputs[name][index])
        answers.append(answer)
    return answers


class AttentionRuns:
    """How jobs of an attention model share a run: ragged merge and split (this module)."""

    def __init__(self, self_attention: bool) -> None:
        self.self_attention = self_attention

    def shape(self, inputs: Mapping[str, np.ndarray]) -> Shape:
        return shape_of(inputs)

    def key(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple:
        return compat_key(inputs, outputs)

    def fraction(self, shapes: Sequence[Shape]) -> float:
        return padding_fraction(shapes, self.self_attention)

    def merge(self, jobs: Sequence[Mapping[str, np.ndarray]]) -> Merged:
        return merge(jobs)

    def split(
        self,
        outputs: Mapping[str, np.ndarray],
        jobs: Sequence[Mapping[str, np.ndarray]],
        asked: Sequence[Sequence[str]],
        spans: Sequence[tuple[int, int]],
    ) -> list[dict[str, np.ndarray]]:
        return split(outputs, jobs, asked, spans)

    def release(self, merged: Merged) -> None:
        return None


class RunShaper(Protocol):
    """How jobs of one kind of model share a session run: who fits with whom, merge, split.

    AttentionRuns serves stateless attention models; decoding.StepRuns the steps of
    sequence models.
    """

    def shape(self, inputs: Mapping[str, np.ndarray]) -> Shape: ...

    def key(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple: ...

    def fraction(self, shapes: Sequence[Shape]) -> float: ...

    def merge(self, jobs: Sequence[Mapping[str, np.ndarray]]) -> Merged: ...

    def split(
        self,
        outputs: Mapping[str, np.ndarray],
        jobs: Sequence[Mapping[str, np.ndarray]],
        asked: Sequence[Sequence[str]],
        spans: Sequence[tuple[int, int]],
    ) -> list[dict[str, np.ndarray]]: ...

    def release(self, merged: Merged) -> None:
        """The run is over and split: merged's buffers may be reused."""
