"""Transport security from files: TLS/mTLS credentials and bearer tokens, both reloaded.

Certificates: `server_credentials` checks at startup that the key matches its certificate (a
one-line StartupError otherwise), then gives gRPC dynamic credentials whose fetcher runs at
each handshake: when a file changed (size, mtime or inode, so Kubernetes' symlink swap of a
Secret counts), the new pair is checked and served from the next handshake on; a pair that
does not load (a rotation caught half-written) keeps the last good one, with a warning.

Tokens: one accepted token a line (blank lines and '#' comments ignored), re-read when the
file changes. Candidates and tokens are compared as SHA-256 digests with
hmac.compare_digest against every token, so neither the time nor the log tells a token.
An unreadable or empty file after a change accepts no token (fails closed), logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from mha.service.core.errors import StartupError
from mha.service.core.settings import Settings

log = logging.getLogger(__name__)

BEARER = "bearer "


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_tokens(path: Path) -> list[bytes]:
    lines = path.read_text(encoding="utf-8").splitlines()
    tokens = [line.strip() for line in lines]
    return [hashlib.sha256(t.encode()).digest() for t in tokens if t and not t.startswith("#")]


class TokenFile:
    """The accepted bearer tokens, from a file re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature = _signature(path)
        try:
            self._digests = _read_tokens(path)
        except (OSError, UnicodeDecodeError) as err:
            raise StartupError(f"--auth-token-file {path}: cannot read it: {err}") from None
        if not self._digests:
            raise StartupError(f"--auth-token-file {path}: no token in it (one token a line)")
        log.info("bearer tokens: %d accepted, from %s", len(self._digests), path)

    def _current(self) -> list[bytes]:
        signature = _signature(self.path)
        if signature == self._signature:
            return self._digests
        with self._lock:
            if signature != self._signature:
                try:
                    digests = _read_tokens(self.path)
                except (OSError, UnicodeDecodeError) as err:
                    log.warning("token file %s unreadable, accepting none: %s", self.path, err)
                    digests = []
                if not digests:
                    log.warning("token file %s holds no token: every call is refused", self.path)
                else:
                    log.info("bearer tokens reloaded: %d accepted", len(digests))
                self._digests, self._signature = digests, signature
        return self._digests

    def accepts(self, authorization: str | None) -> bool:
        """Whether 'Bearer <token>' carries an accepted token (constant time per token)."""
        if authorization is None or authorization[: len(BEARER)].lower() != BEARER:
            return False
        candidate = hashlib.sha256(authorization[len(BEARER) :].strip().encode()).digest()
        accepted = False
        for digest in self._current():
            accepted |= hmac.compare_digest(candidate, digest)
        return accepted


@dataclass(frozen=True)
class _Pair:
    key: bytes
    chain: bytes
    client_ca: bytes | None


def _load_pair(cert: Path, key: Path, client_ca: Path | None) -> _Pair:
    """Read and check the files: the key must match the certificate. Raises ValueError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        reason = "the key does not match the certificate" if "MISMATCH" in str(err) else err
        raise ValueError(f"{cert} and {key}: {reason}") from None
    except OSError as err:
        raise ValueError(f"cannot read {err.filename or cert}: {err.strerror}") from None
    ca = None
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
            ca = client_ca.read_bytes()
        except (ssl.SSLError, OSError) as err:
            raise ValueError(f"client CA file {client_ca}: {err}") from None
    return _Pair(key.read_bytes(), cert.read_bytes(), ca)


class CertificateFiles:
    """The server's certificate, key and client CA files, and the pair last loaded."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = (cert, key, client_ca)
        self._signatures = self._stat()
        try:
            self.pair = _load_pair(cert, key, client_ca)
        except ValueError as err:
            raise StartupError(f"TLS: {err}") from None
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_signature(p) if p is not None else None for p in self.paths)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = self.pair
        return grpc.ssl_server_certificate_configuration(
            [(pair.key, pair.chain)], root_certificates=pair.client_ca
        )

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, at each handshake: a new configuration when the files changed."""
        signatures = self._stat()
        if signatures == self._signatures:
            return None
        self._signatures = signatures
        try:
            self.pair = _load_pair(*self.paths)  # type: ignore[arg-type]
        except ValueError as err:
            log.warning("TLS files changed but do not load, keeping the last good ones: %s", err)
            return None
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.paths[0])
        return self.configuration()


def server_credentials(settings: Settings) -> tuple[grpc.ServerCredentials, CertificateFiles]:
    """Dynamic TLS (mTLS with a client CA) credentials for the gRPC port."""
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    files = CertificateFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    credentials = grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        files.changed,  # type: ignore[arg-type]  # None keeps the configuration (gRPC's docs)
        require_client_authentication=settings.tls_client_ca_file is not None,
    )
    return credentials, files
