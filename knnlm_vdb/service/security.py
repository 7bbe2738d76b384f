"""Who may call the server: TLS credentials and bearer-token scopes.

Tokens. Clients send ``authorization: Bearer <token>``. A read token allows Score,
NextToken, ListDomains and reflection; Append needs a write token whenever any token is
configured (a write token also allows everything else), unless the server runs with
``--allow-read-token-writes``. Tokens come from an environment
variable or a file (one token per line, so a rotation can list the old and the new),
never from argv, and are never logged. Health checks stay open: kubelet probes cannot
send tokens.

TLS. A server certificate and key; with a client CA, clients must present a certificate
it signed (mutual TLS).
"""
from __future__ import annotations

import hmac
import logging
import os

import grpc

from knnlm_vdb.errors import KnnlmError

log = logging.getLogger(__name__)

READ_TOKEN_ENV = "KNNLM_SERVE_TOKEN"
WRITE_TOKEN_ENV = "KNNLM_SERVE_WRITE_TOKEN"
WRITE_METHODS = frozenset({"/knnlm.v1.Knnlm/Append"})
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def read_file(path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KnnlmError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise KnnlmError(f"{what} {path} is empty")
    return data


def read_tokens(path=None, env: str | None = None) -> list[str]:
    """Tokens from ``path`` (one per line, ``#`` comments), else from ``$env``; [] when neither is set."""
    if path is not None:
        text = read_file(path, "token file").decode("utf-8", "replace")
    elif env and os.environ.get(env):
        text = os.environ[env]
    else:
        return []
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for t in tokens:
        if any(c.isspace() for c in t) or not t.isprintable():
            raise KnnlmError(f"a token in {path or '$' + env} contains whitespace or control characters")
    return tokens


def read_secret(path=None, env: str | None = None) -> str | None:
    """One secret (the first token) from a file or an environment variable, or None."""
    tokens = read_tokens(path, env)
    return tokens[0] if tokens else None


def server_credentials(cert_file, key_file, client_ca_file=None) -> grpc.ServerCredentials:
    """TLS for the server; with ``client_ca_file``, clients must present a certificate it signed."""
    if (cert_file is None) != (key_file is None):
        raise KnnlmError("TLS needs both --tls-cert and --tls-key")
    if client_ca_file is not None and cert_file is None:
        raise KnnlmError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    cert, key = read_file(cert_file, "TLS certificate"), read_file(key_file, "TLS key")
    if b"-----BEGIN" not in cert or b"PRIVATE KEY-----" not in key:
        raise KnnlmError(f"--tls-cert {cert_file} and --tls-key {key_file} must be PEM files")
    ca = read_file(client_ca_file, "client CA") if client_ca_file is not None else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as ``handler`` that only answers ``code``."""

    def abort(_request, context):
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuth(grpc.ServerInterceptor):
    """Checks the bearer token of every call except health checks, before the handler runs."""

    def __init__(self, read_tokens: list[str], write_tokens: list[str] = (), allow_read_token_writes: bool = False):
        if not read_tokens and not write_tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._read = [t.encode() for t in read_tokens]
        self._write = [t.encode() for t in write_tokens]
        self._read_may_write = allow_read_token_writes

    @staticmethod
    def _matches(token: bytes, accepted: list[bytes]) -> bool:
        found = False
        for a in accepted:  # compare with every token, in constant time each: no early exit to time
            found |= hmac.compare_digest(token, a)
        return found

    def scope(self, token: str) -> str | None:
        """``write``, ``read`` or None for an unknown token."""
        t = token.encode()
        if self._matches(t, self._write):
            return "write"
        if self._matches(t, self._read):
            return "read"
        return None

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if not token:
            log.info("refused %s: no bearer token", method)
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED,
                           "missing credentials: send the metadata 'authorization: Bearer <token>'")
        scope = self.scope(token)
        if scope is None:
            log.info("refused %s: unknown token", method)
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if method in WRITE_METHODS and scope != "write" and not self._read_may_write:
            log.info("refused %s: read-only token", method)
            why = "this token may only read" if self._write else \
                "the server has none configured (give it one, or start it with --allow-read-token-writes)"
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"{method.rsplit('/', 1)[-1]} needs a write token; {why}")
        return handler
