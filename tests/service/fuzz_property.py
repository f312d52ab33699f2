"""The fuzz property: every answer is a status a client may get, and the server keeps serving.

A call (fuzz_strategies) goes out as bytes through a real channel (no serializer, so
garbage reaches the server as sent). Its answer must be OK, INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, OUT_OF_RANGE or UNAVAILABLE, never INTERNAL or UNKNOWN
(docs/architecture.md, "The wire"); an OK ModelInfer answer must be well formed; on a
stream each error_message starts with one of those names and a stream that ends OK has
answered every request. `probe` checks that good requests still get the same right answer.
DEADLINE_EXCEEDED is a failure too: CALL_TIMEOUT is far above any honest answer time, so
one means the server stalled (or the machine did): look, don't wave it through.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from fuzz_values import REFLECTION, RPCS, STREAM_INFER, Call, E, Sent, Stream, Unary
from google.protobuf.message import DecodeError

from mha.proto import grpc_predict_v2_pb2 as pb
from mha.service.grpc import codec

ACCEPTABLE = frozenset(
    {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "UNAVAILABLE"}
)
CALL_TIMEOUT = 30.0  # seconds; generous for a loaded 2-core machine
SERVICE = "inference.GRPCInferenceService"
PROBE_ATOL = 1e-5  # the same request alone: batching must not change it beyond rounding
OUTPUT_BYTES = {"FP32": 4, "FP16": 2, "BOOL": 1}
MESSAGE_SHOWN = 60  # characters of a refusal message the summary groups by
LEAKS = ("Traceback", "Unexpected <class", "Exception calling application")
# Server settings of the fuzz runs: small limits so OUT_OF_RANGE (a sequence past 64 tokens)
# and RESOURCE_EXHAUSTED (cache budget, sequence count) are reachable with small requests.
SERVER_SETTINGS = {
    "batching": True,
    "max_sequence_length": 64,
    "kv_cache_bytes": 2**20,
    "max_sequences": 64,
    "sequence_idle_seconds": 10.0,
}
DEADLINE_NOTE = (
    f"no answer within {CALL_TIMEOUT:.0f} s: not an acceptable answer; on this shared machine "
    "it may be the test infrastructure (an overloaded host), so look at the server log"
)


@dataclass(frozen=True)
class Problem:
    key: str  # the kind of failure ("ModelInfer INTERNAL"): one key per distinct failure
    message: str


class PropertyFailure(AssertionError):
    """A call broke the property."""


@functools.cache
def failure_type(key: str) -> type[PropertyFailure]:
    """One exception class per kind of failure, so hypothesis reports each kind on its own."""
    return type("Fuzz_" + re.sub(r"\W+", "_", key), (PropertyFailure,), {"__module__": __name__})


def raise_for(problems: list[Problem], call: Call) -> None:
    """Raise the first problem's own PropertyFailure, naming every problem and the call."""
    if problems:
        lines = [f"{p.key}: {p.message}" for p in problems]
        raise failure_type(problems[0].key)("\n".join([*lines, f"call: {call!r}"]))


def method(rpc: str) -> str:
    """The method path of an RPC: GRPCInferenceService's by name, others as service/method."""
    return f"/{rpc}" if "/" in rpc else f"/{SERVICE}/{rpc}"


def refusal_problems(where: str, code: str, details: str) -> list[Problem]:
    """An unacceptable status; a refusal message that leaks internals, or (from our own
    service: `where` without a "/") says nothing. grpc.health.v1 answers an unknown service
    NOT_FOUND with no message, as grpcio-health-checking does."""
    problems = []
    if code not in ACCEPTABLE:
        note = DEADLINE_NOTE if code == "DEADLINE_EXCEEDED" else "never for what a client sent"
        problems.append(Problem(f"{where} {code}", f"details {details!r} ({note})"))
    elif code != "OK" and (
        any(leak in details for leak in LEAKS) or (not details and "/" not in where)
    ):
        problems.append(Problem(f"{where} {code} message", f"bad refusal message {details!r}"))
    return problems


def parsed_request(payload: bytes) -> pb.ModelInferRequest | None:
    try:
        return pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        return None


def answer_problems(
    where: str, request: pb.ModelInferRequest | None, response: pb.ModelInferResponse
) -> list[Problem]:
    """What is wrong with an OK ModelInfer answer to `request` (None: unparsable bytes)."""
    bad = []
    if request is None:
        return [Problem(f"{where} accepted garbage", "OK for bytes that do not parse")]
    if len(response.raw_output_contents) != len(response.outputs):
        bad.append(f"{len(response.outputs)} outputs, {len(response.raw_output_contents)} raw")
    for tensor, data in zip(response.outputs, response.raw_output_contents, strict=False):
        size = OUTPUT_BYTES.get(tensor.datatype, 0) * math.prod(tensor.shape)
        if len(data) != size or tensor.datatype not in OUTPUT_BYTES:
            bad.append(f"{tensor.name} {tensor.datatype} {list(tensor.shape)} in {len(data)} B")
    asked = [o.name for o in request.outputs] or ["output"]
    if sorted(t.name for t in response.outputs) != sorted(asked):
        bad.append(f"outputs {[t.name for t in response.outputs]}, asked for {asked}")
    query = [list(t.shape) for t in request.inputs if t.name == "query"]
    for tensor in response.outputs:
        if tensor.name == "output" and query and list(tensor.shape) != [*query[0][:2], E]:
            bad.append(f"output shape {list(tensor.shape)} for query {query[0]}")
    if (response.id, response.model_name) != (request.id, request.model_name):
        bad.append(f"answers id {response.id!r} of {response.model_name!r}")
    return [Problem(f"{where} OK malformed", "; ".join(bad))] if bad else []


def probe_requests(serial: int) -> dict[str, pb.ModelInferRequest]:
    """Good requests, the same answer every time: self, cross, and a one-request sequence."""
    rng = np.random.default_rng(7)
    query = rng.standard_normal((2, 5, E)).astype(np.float32)
    memory = rng.standard_normal((2, 7, E)).astype(np.float32)
    sequence = {"sequence_id": f"fuzz-probe-{serial}", "sequence_start": True, "sequence_end": True}
    return {
        "self": codec.infer_request("self", {"query": query}),
        "cross": codec.infer_request("cross", {"query": query, "key": memory, "value": memory}),
        "kv": codec.infer_request("kv", {"query": query[:1]}, parameters=sequence),
    }


@dataclass
class Fuzzer:
    """Sends calls through `channel` and checks the property; counts what came back."""

    channel: grpc.Channel
    counts: Counter[str] = field(default_factory=Counter)  # "<rpc> <status>" -> answers
    served: Counter[str] = field(default_factory=Counter)  # model -> OK ModelInfer answers
    refusals: Counter[str] = field(default_factory=Counter)  # "<status> <message start>"
    requests: int = 0  # messages sent (a stream's requests each count)
    probes: int = 0
    reference: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # No serializers: bytes go out as they are and come back as bytes.
        self.unary = {rpc: self.channel.unary_unary(method(rpc)) for rpc in RPCS}
        self.streams = {rpc: self.channel.stream_stream(method(rpc))
                        for rpc in (STREAM_INFER, REFLECTION)}  # fmt: skip

    def run(self, call: Call) -> list[Problem]:
        return self.run_unary(call) if isinstance(call, Unary) else self.run_stream(call)

    def _send(self, rpc: str, payload: bytes) -> tuple[str, str, bytes]:
        self.requests += 1
        try:
            answer = self.unary[rpc](payload, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""  # type: ignore[attr-defined]
            self.counts[f"{rpc} {code}"] += 1
            self.refusals[f"{code} {details[:MESSAGE_SHOWN]}"] += 1
            return code, details, b""
        self.counts[f"{rpc} OK"] += 1
        return "OK", "", answer

    def run_unary(self, call: Unary) -> list[Problem]:
        code, details, answer = self._send(call.rpc, call.sent.payload)
        problems = refusal_problems(call.rpc, code, details)
        if code == "OK" and call.rpc == "ModelInfer":
            request = parsed_request(call.sent.payload)
            response = pb.ModelInferResponse.FromString(answer)
            problems += answer_problems("ModelInfer", request, response)
            self.served[response.model_name] += 1
        return problems

    def run_stream(self, call: Stream) -> list[Problem]:
        self.requests += len(call.items)
        requests = [parsed_request(item.payload) for item in call.items]
        ids = Counter(r.id for r in requests if r is not None)
        answers, problems = 0, []
        payloads: Iterator[bytes] = iter([item.payload for item in call.items])
        responses = self.streams[call.rpc](payloads, timeout=CALL_TIMEOUT)
        code, details = "OK", ""
        try:
            while answers != call.cancel_after:
                data = next(responses)
                answers += 1
                if call.rpc == STREAM_INFER:
                    answer = pb.ModelStreamInferResponse.FromString(data)
                    problems += self._stream_answer(answer, requests, ids)
        except StopIteration:
            pass
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""  # type: ignore[attr-defined]
        else:
            responses.cancel()  # the client goes away; the probe after it checks the server
            self.counts[f"{call.rpc} cancelled by the client"] += 1
            return problems
        self.counts[f"{call.rpc} end {code}"] += 1
        problems += refusal_problems(f"{call.rpc} end", code, details)
        if code == "OK" and answers != len(call.items):
            lost = f"{answers} answers to {len(call.items)} requests"
            problems.append(Problem(f"{call.rpc} lost answers", lost))
        return problems

    def _stream_answer(
        self,
        answer: pb.ModelStreamInferResponse,
        requests: list[pb.ModelInferRequest | None],
        ids: Counter[str],
    ) -> list[Problem]:
        if answer.error_message:
            code, _, details = answer.error_message.partition(": ")
            if code not in grpc.StatusCode.__members__ or code == "OK":
                code = f"unnamed status ({code[:40]!r})"
            self.counts[f"ModelStreamInfer answer {code}"] += 1
            self.refusals[f"{code} {details[:MESSAGE_SHOWN]}"] += 1
            return refusal_problems("ModelStreamInfer answer", code, details)
        self.counts["ModelStreamInfer answer OK"] += 1
        response = answer.infer_response
        self.served[response.model_name] += 1
        if ids[response.id] != 1:  # several requests share the id: only the shape rules apply
            request = pb.ModelInferRequest(id=response.id, model_name=response.model_name)
            request.outputs.extend(
                pb.ModelInferRequest.InferRequestedOutputTensor(name=t.name)
                for t in response.outputs
            )
        else:
            request = next(r for r in requests if r is not None and r.id == response.id)
        return answer_problems("ModelStreamInfer answer", request, response)

    def probe(self) -> list[Problem]:
        """Good requests get OK and the same answer as the first time."""
        self.probes += 1
        problems = []
        for model, request in probe_requests(self.probes).items():
            code, details, data = self._send("ModelInfer", request.SerializeToString())
            if code != "OK":
                problems.append(Problem(f"probe {model} {code}", f"details {details!r}"))
                continue
            output = codec.response_arrays(pb.ModelInferResponse.FromString(data)).get("output")
            if output is None:
                problems.append(Problem(f"probe {model} wrong answer", "no 'output' in it"))
                continue
            expected = self.reference.setdefault(model, output)  # the first answer
            if output.shape != expected.shape:
                wrong = f"output shape {output.shape}, expected {expected.shape}"
            elif not np.allclose(output, expected, rtol=0, atol=PROBE_ATOL):
                wrong = f"max |diff| {np.max(np.abs(output - expected)):.3g} from the first answer"
            else:
                continue
            problems.append(Problem(f"probe {model} wrong answer", wrong))
        return problems

    def summary(self, refusals: int = 0) -> str:
        """Requests sent, answers by status, OK answers by model, the most common refusals."""
        lines = [f"{self.requests} requests sent ({self.probes} probes of 3 good requests)"]
        lines += [f"  {count:8d}  {key}" for key, count in sorted(self.counts.items())]
        lines.append(
            "OK answers by model: "
            + ", ".join(f"{name or '?'}={count}" for name, count in sorted(self.served.items()))
        )
        if refusals:
            lines.append(f"most common refusals (of {len(self.refusals)} kinds):")
            lines += [f"  {n:8d}  {text}" for text, n in self.refusals.most_common(refusals)]
        return "\n".join(lines)


def size(call: Call) -> int:
    items: tuple[Sent, ...] = (call.sent,) if isinstance(call, Unary) else call.items
    return sum(len(item.payload) for item in items)
