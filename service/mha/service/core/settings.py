"""Server settings: one frozen dataclass built once from CLI flags and MHA_* variables.

Precedence: a flag given on the command line, then the environment variable, then the
default. Every setting has both a flag and a variable (table `SPECS`, mirrored in
DEVELOPERS.md), so a container can be configured by environment alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("text", "json")
FREED_HEAP = ("keep", "return")  # core.memory


@dataclass(frozen=True)
class Settings:
    """Everything `mha serve` can be told; passed explicitly to whatever needs it."""

    host: str = "0.0.0.0"
    port: int = 8001
    metrics_port: int | None = 8002  # None = no metrics endpoint (flag value -1)
    repository: Path = Path("models")
    device: str = "auto"
    threads: int | None = None  # intra-op threads; None = from the cgroup CPU quota
    workers: int = 4  # session runs in flight at once (the bounded executor)
    frontends: int | None = None  # protocol processes before one engine; None = by CPU quota
    max_message_bytes: int = 64 * MIB
    max_batch_size: int | None = None  # None = each model's mha.json
    max_sequence_length: int | None = None  # None = each model's mha.json
    reflection: bool = True
    log_level: str = "INFO"
    log_format: str = "text"
    drain_seconds: float = 0.0
    grace_seconds: float = 10.0
    max_connection_age_seconds: float = 0.0  # 0 = off
    max_connection_age_grace_seconds: float = 0.0  # 0 = off
    batching: bool = True
    max_batch_delay_us: int = 0  # 0: batch what queued while the last run was busy
    max_queue_size: int = 256
    max_batches_in_flight: int = 1
    batch_policy: str = "bucket"
    max_padding_fraction: float | None = None  # None: by device (server.padding_for)
    port_file: Path | None = None  # write the bound gRPC port here (useful with port 0)
    metrics_port_file: Path | None = None  # write the bound metrics port here (port 0)
    no_compute: bool = False  # benchmark floor: decode + validate, answer zeros
    kv_cache_bytes: int | None = None  # None: a quarter of the memory limit
    max_sequences: int = 1024  # active sequences at once, over every sequence model
    kv_block_tokens: int = 16  # rows per KV cache block (docs/performance.md, "Paged KV cache")
    prefill_chunk_tokens: int = 64  # a longer prompt runs in chunks of this many (0 = whole)
    sequence_idle_seconds: float = 300.0  # a sequence unused this long is evicted
    max_queue_delay_ms: float = 1000.0  # refuse a request expected to wait longer (0 = off)
    max_concurrent_rpcs: int = 1024  # calls in progress at once, streams included (0 = no limit)
    max_concurrent_streams: int = 0  # HTTP/2 streams per connection (0 = gRPC's: unlimited)
    inline_runs_under_us: float | None = None  # None: by device (models.inline_for)
    tls_cert_file: Path | None = None  # TLS on the gRPC port (with tls_key_file)
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # mTLS: client certificates required, verified
    auth_token_file: Path | None = None  # accepted bearer tokens, one a line
    health_port: int | None = None  # a plaintext port serving grpc.health.v1 only
    health_port_file: Path | None = None  # write the bound health port here (port 0)
    freed_heap: str = "keep"  # keep: reused while busy, trimmed when idle (core.memory)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.freed_heap not in FREED_HEAP:
            raise ValueError(f"freed heap must be keep or return, got {self.freed_heap!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be text or json, got {self.log_format!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health port must be in 0..65535, got {self.health_port}")
        if self.health_port is not None and self.health_port == self.port != 0:
            raise ValueError(
                f"health port {self.health_port} is the gRPC port: plaintext health and the "
                f"inference service never share a port"
            )
        if self.health_port is not None and self.health_port == self.metrics_port != 0:
            raise ValueError(f"health port {self.health_port} is the metrics port")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "--tls-client-ca-file (mTLS) needs TLS on: give --tls-cert-file and --tls-key-file"
            )
        positive: dict[str, int | None] = {
            "threads": self.threads,
            "workers": self.workers,
            "frontends": self.frontends,
            "max_message_bytes": self.max_message_bytes,
            "max_batch_size": self.max_batch_size,
            "max_sequence_length": self.max_sequence_length,
            "max_queue_size": self.max_queue_size,
            "max_batches_in_flight": self.max_batches_in_flight,
            "kv_cache_bytes": self.kv_cache_bytes,
            "max_sequences": self.max_sequences,
            "kv_block_tokens": self.kv_block_tokens,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        non_negative: dict[str, float] = {
            "drain_seconds": self.drain_seconds,
            "grace_seconds": self.grace_seconds,
            "max_connection_age_seconds": self.max_connection_age_seconds,
            "max_connection_age_grace_seconds": self.max_connection_age_grace_seconds,
            "max_batch_delay_us": self.max_batch_delay_us,
            "sequence_idle_seconds": self.sequence_idle_seconds,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "inline_runs_under_us": self.inline_runs_under_us or 0.0,
            "max_concurrent_rpcs": self.max_concurrent_rpcs,
            "max_concurrent_streams": self.max_concurrent_streams,
        }
        for name, amount in non_negative.items():
            if amount < 0:
                raise ValueError(f"{name} must be >= 0, got {amount}")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, on/off), got {text!r}")


def _port_or_off(text: str) -> int | None:
    # 0 binds a free port (tests, benchmarks); "off" or -1 turns the endpoint off.
    if text.strip().lower() in ("off", "-1"):
        return None
    return int(text)


@dataclass(frozen=True)
class Spec:
    """One setting: its field, flag, environment variable, parser and help."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SPECS: tuple[Spec, ...] = (
    Spec("host", "MHA_HOST", str, "address to bind"),
    Spec("port", "MHA_PORT", int, "gRPC port (0 = any free port)"),
    Spec("metrics_port", "MHA_METRICS_PORT", _port_or_off,
         "Prometheus /metrics port (0 = any free port, off = no endpoint)"),
    Spec("repository", "MHA_REPOSITORY", Path, "model repository folder"),
    Spec("device", "MHA_DEVICE", str, "execution provider policy", DEVICES),
    Spec("threads", "MHA_THREADS", int, "intra-op threads per session (default: CPU quota)"),
    Spec("workers", "MHA_WORKERS", int, "session runs in flight at once"),
    Spec("frontends", "MHA_FRONTENDS", int,
         "protocol processes (gRPC, TLS, parsing) in front of one engine process on the same "
         "port; 1 = one process does all (default: by CPU quota)"),
    Spec("max_message_bytes", "MHA_MAX_MESSAGE_BYTES", int, "largest gRPC message"),
    Spec("max_batch_size", "MHA_MAX_BATCH_SIZE", int, "samples per request (default: mha.json)"),
    Spec("max_sequence_length", "MHA_MAX_SEQUENCE_LENGTH", int,
         "L and S per request (default: mha.json)"),
    Spec("reflection", "MHA_REFLECTION", _bool, "serve gRPC reflection"),
    Spec("log_level", "MHA_LOG_LEVEL", str.upper, "log level"),
    Spec("log_format", "MHA_LOG_FORMAT", str, "log format", LOG_FORMATS),
    Spec("drain_seconds", "MHA_DRAIN_SECONDS", float,
         "on SIGTERM: NOT_SERVING but still serving for this long"),
    Spec("grace_seconds", "MHA_GRACE_SECONDS", float, "in-flight requests finish within this"),
    Spec("max_connection_age_seconds", "MHA_MAX_CONNECTION_AGE_SECONDS", float,
         "close connections after this age (0 = off)"),
    Spec("max_connection_age_grace_seconds", "MHA_MAX_CONNECTION_AGE_GRACE_SECONDS", float,
         "grace for calls on an aged connection (0 = off)"),
    Spec("batching", "MHA_BATCHING", _bool, "dynamic batching"),
    Spec("max_batch_delay_us", "MHA_MAX_BATCH_DELAY_US", int,
         "how long a batch's first request may wait for company (0: no wait)"),
    Spec("max_queue_size", "MHA_MAX_QUEUE_SIZE", int, "requests waiting per model version"),
    Spec("max_batches_in_flight", "MHA_MAX_BATCHES_IN_FLIGHT", int,
         "session runs at once per model version with batching on"),
    Spec("batch_policy", "MHA_BATCH_POLICY", str, "padding policy of the batcher"),
    Spec("max_padding_fraction", "MHA_MAX_PADDING_FRACTION", float,
         "padded tokens / all tokens allowed in one batch (default: 0 on CPU, 0.25 on CUDA)"),
    Spec("port_file", "MHA_PORT_FILE", Path, "write the bound gRPC port to this file"),
    Spec("metrics_port_file", "MHA_METRICS_PORT_FILE", Path,
         "write the bound metrics port to this file (before the gRPC port file)"),
    Spec("no_compute", "MHA_NO_COMPUTE", _bool,
         "benchmark floor: validate requests, answer zeros without running the model"),
    Spec("kv_cache_bytes", "MHA_KV_CACHE_BYTES", int,
         "bytes all sequences' KV caches may hold (default: a quarter of the memory limit)"),
    Spec("max_sequences", "MHA_MAX_SEQUENCES", int, "active sequences at once"),
    Spec("kv_block_tokens", "MHA_KV_BLOCK_TOKENS", int,
         "tokens per KV cache block: sequences hold their cache in blocks of this many rows"),
    Spec("prefill_chunk_tokens", "MHA_PREFILL_CHUNK_TOKENS", int,
         "a request with more new tokens runs in chunks of this many, other sequences' "
         "steps between them (0 = in one run)"),
    Spec("sequence_idle_seconds", "MHA_SEQUENCE_IDLE_SECONDS", float,
         "evict a sequence unused for this long"),
    Spec("max_queue_delay_ms", "MHA_MAX_QUEUE_DELAY_MS", float,
         "refuse at once (UNAVAILABLE) a request expected to queue longer (0 = off)"),
    Spec("max_concurrent_rpcs", "MHA_MAX_CONCURRENT_RPCS", int,
         "calls in progress at once, streams included; more get RESOURCE_EXHAUSTED before "
         "their message is read (0 = no limit)"),
    Spec("max_concurrent_streams", "MHA_MAX_CONCURRENT_STREAMS", int,
         "HTTP/2 streams open at once per connection: bounds what one client can make the "
         "server buffer (0 = unlimited)"),
    Spec("inline_runs_under_us", "MHA_INLINE_RUNS_UNDER_US", float,
         "a session run expected to take under this many us runs on the event loop, "
         "saving the thread hop (0 = always the executor; default 20000 on CPU, 0 on CUDA)"),
    Spec("tls_cert_file", "MHA_TLS_CERT_FILE", Path,
         "TLS: the server's certificate chain, PEM (reloaded when the file changes)"),
    Spec("tls_key_file", "MHA_TLS_KEY_FILE", Path, "TLS: the server's private key, PEM"),
    Spec("tls_client_ca_file", "MHA_TLS_CLIENT_CA_FILE", Path,
         "mTLS: require client certificates signed by these CAs, PEM"),
    Spec("auth_token_file", "MHA_AUTH_TOKEN_FILE", Path,
         "accepted bearer tokens, one a line (re-read when the file changes)"),
    Spec("health_port", "MHA_HEALTH_PORT", _port_or_off,
         "a plaintext port serving grpc.health.v1 only, for probes (off = none)"),
    Spec("health_port_file", "MHA_HEALTH_PORT_FILE", Path,
         "write the bound health port to this file (before the gRPC port file)"),
    Spec("freed_heap", "MHA_FREED_HEAP", str,
         "keep: glibc reuses freed heap while busy (fewer page faults on large requests), "
         "trimmed once idle; return: glibc's own thresholds", FREED_HEAP),
)  # fmt: skip

_BOOLEAN_FIELDS = {"reflection", "batching", "no_compute"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; a flag not given is absent, so the environment can fill it."""
    defaults = Settings()
    for spec in SPECS:
        default = getattr(defaults, spec.field)
        shown = "" if default is None else f"; default {default}"
        help_text = f"{spec.help} [env {spec.env}{shown}]"
        if spec.field == "no_compute":  # a mode switched on, never "--no-no-compute"
            parser.add_argument(
                spec.flag, dest=spec.field, action="store_const", const=True,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        elif spec.field in _BOOLEAN_FIELDS:
            parser.add_argument(
                spec.flag, dest=spec.field, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                spec.flag, dest=spec.field, type=spec.parse, choices=spec.choices,
                default=argparse.SUPPRESS, help=help_text, metavar=spec.field.upper(),
            )  # fmt: skip


def from_sources(args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """Build Settings: flag if given, else MHA_* variable, else the default.

    Raises ValueError naming the variable or setting when a value does not parse.
    """
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}
    for spec in SPECS:
        assert spec.field in known  # a typo in SPECS is a bug, not an input error
        if args is not None and hasattr(args, spec.field):  # given on the command line
            values[spec.field] = getattr(args, spec.field)
        elif environ.get(spec.env, "") != "":
            try:
                values[spec.field] = spec.parse(environ[spec.env])
            except ValueError as err:
                raise ValueError(f"{spec.env}={environ[spec.env]!r}: {err}") from None
            if spec.choices and values[spec.field] not in spec.choices:
                raise ValueError(
                    f"{spec.env}={environ[spec.env]!r}: choose from {', '.join(spec.choices)}"
                )
    return Settings(**values)
