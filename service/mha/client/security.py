"""How a client reaches a secured server: TLS (mTLS with a client pair) and a bearer token.

`Security` holds the files; the channel is TLS when any TLS option is given (a CA file, or
`tls=True` for the system's trusted roots), and every call carries
`authorization: Bearer <token>` when a token file is given. The token goes as call metadata,
so it works over plaintext too (behind a mesh that adds TLS); it is read once and never
printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

Metadata = tuple[tuple[str, str], ...]


def read_token(path: Path) -> str:
    """The first token in a token file (one a line, '#' comments and blank lines skipped)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise ValueError(f"{path}: no token in it (one token a line)")


@dataclass(frozen=True)
class Security:
    """TLS files, the token file, and the name the server's certificate must carry."""

    tls: bool = False  # TLS with the system's roots when no CA file is given
    ca_file: Path | None = None
    cert_file: Path | None = None  # mTLS: the client's certificate chain
    key_file: Path | None = None  # and its key
    token_file: Path | None = None
    server_name: str | None = None  # check the certificate for this name, not the URL's host

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both --tls-cert-file and --tls-key-file")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        read = lambda path: path.read_bytes() if path is not None else None  # noqa: E731
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def metadata(self) -> Metadata:
        if self.token_file is None:
            return ()
        return (("authorization", f"Bearer {read_token(self.token_file)}"),)

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def channel(url: str, options: list[tuple[str, Any]], security: Security | None) -> grpc.Channel:
    credentials = security.credentials() if security is not None else None
    if credentials is None:
        return grpc.insecure_channel(url, options=options)
    return grpc.secure_channel(url, credentials, options=[*options, *security.options()])  # type: ignore[union-attr]


def aio_channel(
    url: str, options: list[tuple[str, Any]], security: Security | None
) -> grpc.aio.Channel:
    credentials = security.credentials() if security is not None else None
    if credentials is None:
        return grpc.aio.insecure_channel(url, options=options)
    return grpc.aio.secure_channel(url, credentials, options=[*options, *security.options()])  # type: ignore[union-attr]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's security flags (mha infer, mha decode)."""
    group = parser.add_argument_group("security (a server started with TLS or tokens)")
    group.add_argument(
        "--tls",
        action="store_true",
        help="TLS, trusting the system's roots (implied by the --tls-* files)",
    )
    group.add_argument(
        "--tls-ca-file", type=Path, metavar="PEM", help="TLS, trusting these CA certificates"
    )
    group.add_argument(
        "--tls-cert-file", type=Path, metavar="PEM", help="mTLS: this client's certificate chain"
    )
    group.add_argument("--tls-key-file", type=Path, metavar="PEM", help="mTLS: its private key")
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must carry (default: URL host)",
    )
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help="send 'authorization: Bearer <first token in FILE>'")  # fmt: skip


def from_args(args: argparse.Namespace) -> Security:
    """Security from the flags; ValueError names what is wrong."""
    files: Sequence[Path | None] = (
        args.tls_ca_file,
        args.tls_cert_file,
        args.tls_key_file,
        args.token_file,
    )
    for path in files:
        if path is not None and not path.is_file():
            raise ValueError(f"{path}: no such file")
    return Security(
        tls=args.tls, ca_file=args.tls_ca_file, cert_file=args.tls_cert_file,
        key_file=args.tls_key_file, token_file=args.token_file, server_name=args.tls_server_name,
    )  # fmt: skip
