"""Every RPC's front door: the bearer token first, then the message parsed inside the handler.

gRPC would otherwise parse a request before any of our code runs, and a message that does not
parse comes back UNKNOWN with protobuf's exception class in its details. So every method is
registered with raw bytes in (`Registrar` stands in for the server in the generated
add_*_to_server calls and wraps each method handler). The wrapper then
  1. refuses a call without an accepted token (UNAUTHENTICATED, one fixed message per case;
     the token is never logged), unless the service is open (grpc.health.v1);
  2. parses the request: an undecodable one is INVALID_ARGUMENT "request is not a valid
     <message type>", logged once under a request id made for it. On a request stream the
     method may take the `Undecodable` in its place (ModelStreamInfer answers that request
     alone and keeps the stream open); on any other stream the call ends INVALID_ARGUMENT.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from mha.service.core import logs

log = logging.getLogger(__name__)

MISSING_TOKEN = "missing credentials: send metadata 'authorization: Bearer <token>'"
WRONG_TOKEN = "the bearer token is not accepted"
HEALTH_SERVICE = "grpc.health.v1.Health"


# A method's own (parse the request bytes, serialize the answer or None for bytes answers).
Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes] | None]


class TokenCheck(Protocol):
    def accepts(self, authorization: str | None) -> bool: ...


@dataclass(frozen=True)
class Undecodable:
    """A request message on a stream that did not parse; `message` is the fixed refusal."""

    message: str
    request_id: str


def not_valid(message_type: str) -> str:
    return f"request is not a valid {message_type}"


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # a generated Message.FromString
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "message"))


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class Guard:
    """Wraps method handlers: tokens (when given) and parsing inside the handler."""

    def __init__(self, tokens: TokenCheck | None, *, open_services: Iterable[str] = ()) -> None:
        self.tokens = tokens
        self.open_services = frozenset(open_services)
        self.refusals = {"unauthenticated": 0, "undecodable": 0}

    def wrap(
        self,
        service: str,
        name: str,
        handler: grpc.RpcMethodHandler,
        *,
        takes_undecodable: bool,
        codec: Codec | None = None,
    ) -> grpc.RpcMethodHandler:
        """`codec` replaces the generated (parse, serialize) pair; a None serializer means
        the method answers bytes already serialized."""
        method = f"/{service}/{name}"
        check = self.tokens if service not in self.open_services else None
        parse = handler.request_deserializer
        if parse is None:
            raise TypeError(f"{method}: a handler without a request deserializer")
        kind = _message_type(parse)
        serialize = handler.response_serializer
        if codec is not None:
            parse, serialize = codec

        async def admit(context: grpc.aio.ServicerContext) -> None:
            if check is None:
                return
            await refuse_unless_accepted(context)

        async def refuse_unless_accepted(context: grpc.aio.ServicerContext) -> None:
            assert check is not None
            authorization = _authorization(context)
            if check.accepts(authorization):
                return
            self.refusals["unauthenticated"] += 1
            why = MISSING_TOKEN if authorization is None else WRONG_TOKEN
            log.info("%s refused: UNAUTHENTICATED %s", method, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(raw)
            except Exception:
                await refuse_undecodable(raw, context)

        async def refuse_undecodable(raw: bytes, context: grpc.aio.ServicerContext) -> None:
            request_id = logs.new_request_id()
            self.refusals["undecodable"] += 1
            log.info(
                "%s refused: INVALID_ARGUMENT %s (%d bytes)", method, not_valid(kind), len(raw),
                extra={"request_id": request_id},
            )  # fmt: skip
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, not_valid(kind))

        async def each(
            raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for raw in raws:
                try:
                    yield parse(raw)
                except Exception:
                    request_id = logs.new_request_id()
                    self.refusals["undecodable"] += 1
                    log.info(
                        "%s: INVALID_ARGUMENT %s (%d bytes)", method, not_valid(kind), len(raw),
                        extra={"request_id": request_id},
                    )  # fmt: skip
                    if not takes_undecodable:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, not_valid(kind))
                    yield Undecodable(not_valid(kind), request_id)

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                # The hot path (ModelInfer): no coroutine beyond the method's own when no
                # token is required and the message parses.
                if check is not None:
                    await refuse_unless_accepted(context)
                try:
                    request = parse(raw)
                except Exception:
                    await refuse_undecodable(raw, context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream
            if inspect.isasyncgenfunction(inner_us):

                async def unary_stream_gen(
                    raw: bytes, context: grpc.aio.ServicerContext
                ) -> AsyncIterator[Any]:
                    await admit(context)
                    async for answer in inner_us(await parsed(raw, context), context):
                        yield answer

                return grpc.unary_stream_rpc_method_handler(
                    unary_stream_gen, response_serializer=serialize
                )

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)  # the method writes with context.write
                return await inner_us(await parsed(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream

            async def stream_stream(
                raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                await admit(context)
                async for answer in inner_ss(each(raws, context), context):
                    yield answer

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, response_serializer=serialize
            )
        raise TypeError(f"{method}: client-streaming methods are not served")


class Registrar:
    """Stands in for the server in generated add_*_to_server(servicer, server) calls.

    Generated code registers a method table twice, as a generic handler and as registered
    methods; both get the guarded table. `takes_undecodable` names the methods that take an
    `Undecodable` on their request stream; `codecs` the methods with their own Codec.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        guard: Guard,
        takes_undecodable: Iterable[str] = (),
        codecs: Mapping[str, Codec] | None = None,
    ) -> None:
        self.server = server
        self.guard = guard
        self.takes_undecodable = frozenset(takes_undecodable)
        self.codecs = dict(codecs or {})  # method path -> its own Codec
        self.pending = 0  # generic handlers not yet followed by their method table

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        # Followed by add_registered_method_handlers with the same table (checked in done()).
        self.pending += len(list(handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        guarded = {
            name: self.guard.wrap(
                service,
                name,
                handler,
                takes_undecodable=self._takes(service, name),
                codec=self.codecs.get(f"/{service}/{name}"),
            )
            for name, handler in handlers.items()
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        self.server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
        self.pending = max(0, self.pending - 1)

    def _takes(self, service: str, name: str) -> bool:
        return f"/{service}/{name}" in self.takes_undecodable

    def done(self) -> None:
        """Raise if a service registered only a generic handler (it would go unguarded)."""
        if self.pending:
            raise TypeError(f"{self.pending} generic handler(s) registered without a table")
