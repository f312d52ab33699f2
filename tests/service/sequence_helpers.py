"""Helpers of the sequence tests: the local oracle and the step check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from mha import contract

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
