"""Garbage: random requests, mostly valid, some hostile, some not protobuf (`mha bench flood`).

Each request is drawn from (seed, index) alone, so a run can be replayed. Kinds:
  valid           B 1-8, L 1-256, bytes matching (a key_padding_mask now and then): OK
  large           bytes matching, shapes up to the limits as far as --random-max-mib allows
  off_by_one      shapes up to the limits, raw bytes one byte (or one element) off
  declared_large  shapes at, past or far past the limits (2**31, 2**62, negative, wrong
                  rank) over a few KiB of data: refusable from the header alone
  over_limit      one past max_batch_size or max_sequence_length, bytes matching
  malformed       parsable but wrong: unknown model, input, datatype, output or version,
                  raw and typed contents at once, NaN, a mask of the wrong shape, ...
  garbage         not a ModelInferRequest: random bytes, a truncated or corrupted one
                  (a corrupted byte may land in the tensor data and leave a valid request)
Everything but valid and large should be refused, and nothing with INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mha import contract
from mha.proto import grpc_predict_v2_pb2 as pb

KINDS = {  # kind -> share of the requests
    "valid": 0.55,
    "large": 0.02,
    "off_by_one": 0.12,
    "declared_large": 0.08,
    "over_limit": 0.04,
    "malformed": 0.09,
    "garbage": 0.10,
}
Tensor = tuple[str, str, list[int], bytes]  # name, datatype, shape, raw bytes


@dataclass(frozen=True)
class Shapes:
    """The model the requests are shaped after: its width, datatype and limits."""

    model: str
    width: int  # E
    datatype: str  # FP32 or FP16
    max_batch: int
    max_length: int
    max_send_bytes: int  # raw bytes of one request at most (over_limit excepted)
    has_mask: bool = True  # the model takes the optional key_padding_mask


def encode(model: str, tensors: list[Tensor], version: str = "") -> pb.ModelInferRequest:
    """A ModelInferRequest with raw contents, one entry per tensor in order."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


class RandomRequests:
    """make(index) -> (kind, serialized request bytes)."""

    def __init__(self, shapes: Shapes, seed: int) -> None:
        self.shapes, self.seed = shapes, seed
        self.item = contract.DTYPES[shapes.datatype].itemsize
        longest = (shapes.max_length + 1) * shapes.width * self.item  # over_limit's
        values = (max(shapes.max_send_bytes, longest) + 64 * 1024) // self.item + 1
        dtype = contract.DTYPES[shapes.datatype]
        # Finite values only: a NaN would be refused, and that is the malformed kind's job.
        self.pool = np.random.default_rng(seed).standard_normal(values).astype(dtype).tobytes()
        self.builders: dict[str, Callable[[random.Random], bytes]] = {
            "valid": self.valid,
            "large": self.large,
            "off_by_one": self.off_by_one,
            "declared_large": self.declared_large,
            "over_limit": self.over_limit,
            "malformed": self.malformed,
            "garbage": self.garbage,
        }

    def make(self, index: int) -> tuple[str, bytes]:
        rng = random.Random(self.seed * 1_000_003 + index)
        [kind] = rng.choices(list(KINDS), weights=list(KINDS.values()))
        return kind, self.builders[kind](rng)

    def query(self, batch: int, length: int, extra: int = 0) -> Tensor:
        raw = self.pool[: batch * length * self.shapes.width * self.item + extra]
        return contract.QUERY, self.shapes.datatype, [batch, length, self.shapes.width], raw

    def send(self, tensors: list[Tensor], version: str = "") -> bytes:
        return encode(self.shapes.model, tensors, version).SerializeToString()

    def fitting(self, rng: random.Random) -> tuple[int, int]:
        """B and L up to the limits whose query fits in max_send_bytes."""
        tokens = max(1, self.shapes.max_send_bytes // (self.shapes.width * self.item))
        length = rng.randint(1, min(self.shapes.max_length, tokens))
        return rng.randint(1, max(1, min(self.shapes.max_batch, tokens // length))), length

    def valid(self, rng: random.Random) -> bytes:
        batch, length = rng.randint(1, min(8, self.shapes.max_batch)), rng.randint(1, 256)
        length = min(length, self.shapes.max_length)
        tensors = [self.query(batch, length)]
        if (
            self.shapes.has_mask and rng.random() < 0.3
        ):  # True = padding; the first key of every sample stays
            mask = np.random.default_rng(rng.getrandbits(32)).random((batch, length)) < 0.3
            mask[:, 0] = False
            tensors.append(
                (contract.KEY_PADDING_MASK, contract.BOOL, [batch, length], mask.tobytes())
            )
        return self.send(tensors)

    def large(self, rng: random.Random) -> bytes:
        return self.send([self.query(*self.fitting(rng))])

    def off_by_one(self, rng: random.Random) -> bytes:
        batch, length = self.fitting(rng)
        step = rng.choice((1, 1, 1, self.item))
        off = step if rng.random() < 0.5 else -step
        return self.send([self.query(batch, length, off)])

    def declared_large(self, rng: random.Random) -> bytes:
        s, e = self.shapes, self.shapes.width
        shape = rng.choice(
            [
                [s.max_batch, s.max_length, e],
                [s.max_batch + 1, 16, e],
                [1, s.max_length + 1, e],
                [2**31, 2**31, e],
                [2**62, 1, e],
                [1, 2**62, e],
                [-1, 16, e],
                [0, 16, e],
                [1, 16, e + 1],
                [1, 16],
                [1, 1, 16, e],
                [],
            ]
        )
        raw = self.pool[: rng.randint(0, 64 * 1024)]
        return self.send([(contract.QUERY, s.datatype, shape, raw)])

    def over_limit(self, rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return self.send([self.query(self.shapes.max_batch + 1, rng.randint(1, 4))])
        return self.send([self.query(1, self.shapes.max_length + 1)])

    def malformed(self, rng: random.Random) -> bytes:
        s, batch, length = self.shapes, rng.randint(1, 4), rng.randint(1, 64)
        query = self.query(batch, length)
        name, datatype, shape, raw = query
        choice = rng.randrange(13)
        if choice == 0:
            return encode("no-such-model", [query]).SerializeToString()
        if choice == 1:
            return self.send([("querry", datatype, shape, raw)])
        if choice == 2:
            wrong = rng.choice(["FP64", "INT8", "BF16", "BYTES", "fp32", ""])
            return self.send([(name, wrong, shape, raw)])
        if choice == 3:  # the mask alone
            return self.send(
                [(contract.KEY_PADDING_MASK, contract.BOOL, [batch, length], bytes(batch * length))]
            )
        if choice == 4:
            return self.send([query, query])
        if choice == 5:  # raw and typed contents at once
            request = encode(s.model, [query])
            request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
            return request.SerializeToString()
        if choice == 6:  # typed contents, one value short
            request = pb.ModelInferRequest(model_name=s.model)
            tensor = request.inputs.add(name=name, datatype="FP32", shape=shape)
            tensor.contents.fp32_contents.extend([0.5] * (batch * length * s.width - 1))
            return request.SerializeToString()
        if choice == 7:  # two raw entries for one input
            request = encode(s.model, [query])
            request.raw_input_contents.append(raw)
            return request.SerializeToString()
        if choice == 8:  # one NaN
            values = np.frombuffer(raw, contract.DTYPES[datatype]).copy()
            values[rng.randrange(values.size)] = np.nan
            return self.send([(name, datatype, shape, values.tobytes())])
        if choice == 9:  # a mask one key too long
            mask = (
                contract.KEY_PADDING_MASK,
                contract.BOOL,
                [batch, length + 1],
                bytes(batch * (length + 1)),
            )
            return self.send([query, mask])
        if choice == 10:
            request = encode(s.model, [query])
            request.outputs.add(name="attention_weights" if rng.random() < 0.5 else "nope")
            return request.SerializeToString()
        if choice == 11:  # sequence control on a stateless model
            request = encode(s.model, [query])
            request.parameters["sequence_id"].int64_param = rng.randint(1, 1 << 40)
            request.parameters["sequence_start"].bool_param = True
            return request.SerializeToString()
        return self.send([query], version=rng.choice(["99", "-1", "x", "1.0"]))

    def garbage(self, rng: random.Random) -> bytes:
        choice = rng.randrange(3)
        if choice == 0:
            return rng.randbytes(rng.randint(1, 4096))
        body = bytearray(self.send([self.query(rng.randint(1, 2), rng.randint(1, 32))]))
        if choice == 1:
            return bytes(body[: rng.randrange(len(body))])  # truncated
        for _ in range(rng.randint(1, 8)):  # a few corrupted bytes, mostly in the header
            body[rng.randrange(min(len(body), 64))] = rng.randrange(256)
        return bytes(body)


def query_request(shapes: Shapes, batch: int, length: int, seed: int = 0) -> bytes:
    """A valid request: query [B, L, E] of seeded standard-normal values, raw contents."""
    dtype = contract.DTYPES[shapes.datatype]
    shape = [batch, length, shapes.width]
    raw = np.random.default_rng(seed).standard_normal(shape).astype(dtype).tobytes()
    return encode(shapes.model, [(contract.QUERY, shapes.datatype, shape, raw)]).SerializeToString()
