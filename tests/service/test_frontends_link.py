"""The link's parts without processes: the arena's slots, and requests and answers as frames."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from mha.service.core.errors import NotFound, OutOfRange
from mha.service.core.inference import InferRequest, InferResponse, InputTensor, Unreadable
from mha.service.frontends import messages
from mha.service.frontends.arena import ALIGN, Arena, ArenaFull
from mha.service.frontends.link import encode


def through_the_wire(frame: dict) -> dict:
    """A frame as the other side reads it (length prefix off, JSON parsed)."""
    return json.loads(encode(frame)[4:])


def test_slots_are_aligned_reused_and_merged_when_freed():
    arena = Arena.create("test", 8 * ALIGN)
    first, second, third = (arena.allocate(ALIGN + 1), arena.allocate(1), arena.allocate(1))
    assert (first, second, third) == (0, 2 * ALIGN, 3 * ALIGN)
    with pytest.raises(ArenaFull):
        arena.allocate(5 * ALIGN)
    arena.free(second, 1)
    arena.free(first, ALIGN + 1)  # merges with the free slot after it
    assert arena.allocate(3 * ALIGN) == 0
    arena.free(0, 3 * ALIGN)
    arena.free(third, 1)  # everything free again: one run
    assert arena.free_bytes == 8 * ALIGN and arena.allocate(8 * ALIGN) == 0
    arena.close()


def test_a_full_arena_makes_the_writer_wait_for_a_slot():
    async def scenario() -> int:
        arena = Arena.create("test", 2 * ALIGN)
        held = await arena.place(b"x" * (2 * ALIGN))
        waiting = asyncio.create_task(arena.place(b"y" * ALIGN))
        await asyncio.sleep(0)
        assert not waiting.done()
        arena.free(held, 2 * ALIGN)
        return await waiting

    assert asyncio.run(scenario()) == 0


def test_a_request_crosses_with_raw_typed_and_unreadable_inputs():
    async def scenario() -> InferRequest:
        arena = Arena.create("test", 1 << 16)
        query = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
        request = InferRequest(
            "m", "2", "id-1",
            inputs=[InputTensor("query", "FP32", (1, 2, 3), memoryview(query.tobytes())),
                    InputTensor("key", "FP32", (1, 1, 2), [1.0, float("nan")], "fp32_contents"),
                    InputTensor("value", "FP16", (1,), Unreadable("why"))],
            parameters={"sequence_id": 7, "sequence_start": True}, timeout=2.5,
            session="stream-1",
        )  # fmt: skip
        frame, _ = await messages.request_frame(1, request, arena)
        return messages.request_from(through_the_wire(frame), arena, frontend=3)

    got = asyncio.run(scenario())
    query, key, value = got.inputs
    assert bytes(query.data) == np.arange(6, dtype=np.float32).tobytes()  # type: ignore[arg-type]
    assert key.source == "fp32_contents" and np.isnan(key.data[1])  # type: ignore[index]
    assert value.data == Unreadable("why")
    assert got.parameters == {"sequence_id": 7, "sequence_start": True}
    assert got.session == (3, "stream-1") and got.timeout == 2.5 and got.id == "id-1"


def test_an_answer_and_a_refusal_cross_as_they_were():
    async def scenario() -> InferResponse:
        arena = Arena.create("test", 1 << 16)
        outputs = {"output": np.ones((2, 3), np.float16), "attention_weights": np.eye(2)}
        response = InferResponse("m", "1", "id", outputs, {"provider": "CPU"}, 5, 6, 2)
        frame = await messages.answer_frame(1, response, arena)
        return messages.response_from(through_the_wire(frame), arena)[0]

    got = asyncio.run(scenario())
    assert list(got.outputs) == ["output", "attention_weights"]
    assert got.outputs["output"].dtype == np.float16 and got.outputs["output"].shape == (2, 3)
    np.testing.assert_array_equal(got.outputs["attention_weights"], np.eye(2))
    assert (got.queue_ns, got.compute_ns, got.batch_size) == (5, 6, 2)
    for err in (NotFound("no such model"), OutOfRange("past the context")):
        again = messages.error_from(through_the_wire(messages.error_frame(1, err)))
        assert type(again) is type(err) and again.message == err.message  # type: ignore[attr-defined]
