"""Helpers of the sequence tests: the local oracle, the step check, concurrent decoding."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mha import contract
from mha.client import AsyncClient, SequenceStep

E = 64  # the test exports' d_model
ATOL = contract.PARITY_TOLERANCE["FP32"][0]


class FullForward:
    """The step graph run locally from an empty cache: the full causal forward."""

    def __init__(self, model_dir: Path) -> None:
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [1, N, E] -> the output rows [1, N, E] of causal attention over them."""
        empty = np.zeros((1, 0, tokens.shape[2]), tokens.dtype)
        feeds = {
            contract.QUERY: tokens,
            contract.PAST_KEY: empty,
            contract.PAST_VALUE: empty,
            contract.KEY_PADDING_MASK: np.zeros((1, tokens.shape[1]), bool),
        }
        return self.session.run([contract.OUTPUT], feeds)[0]


def chunks(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    return [rng.standard_normal((1, n, E)).astype(np.float32) for n in sizes]


def check_steps(oracle: FullForward, sent: list[np.ndarray], answers: list[np.ndarray]) -> None:
    """Each answer equals the last rows of the full forward over everything sent so far."""
    for step, answer in enumerate(answers):
        tokens = np.concatenate(sent[: step + 1], axis=1)
        want = oracle(tokens)[:, -sent[step].shape[1] :]
        np.testing.assert_allclose(answer, want, rtol=0, atol=ATOL, err_msg=f"step {step}")


def decode_concurrently(
    url: str, model: str, plans: Mapping[int, list[np.ndarray]]
) -> list[list[np.ndarray]]:
    """Every plan (sequence id -> its queries, the first the prompt) stepped at once through
    one client, each step awaited before that sequence's next; answers in plans' order."""

    async def decode(client: AsyncClient, sequence_id: int) -> list[np.ndarray]:
        answers, queries = [], plans[sequence_id]
        for i, query in enumerate(queries):
            step = SequenceStep(sequence_id, start=i == 0, end=i == len(queries) - 1)
            result = await client.infer(model, {contract.QUERY: query}, sequence=step)
            answers.append(result.outputs[contract.OUTPUT])
        return answers

    async def main() -> list[list[np.ndarray]]:
        async with AsyncClient(url) as client:
            return await asyncio.gather(*(decode(client, s) for s in plans))

    return asyncio.run(main())
