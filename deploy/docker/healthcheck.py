#!/usr/bin/env python3
"""Docker HEALTHCHECK for the knnlm-vdb image.

When the container runs ``knnlm-vdb serve``, ask its grpc.health.v1 service (overall status,
service "") and exit 0 only for SERVING. Any other command (build, append, migrate, ...) is a
batch run: exit 0. Kubernetes ignores this and uses the chart's native gRPC probes.

Which port, read like serve reads its options (command line first, then the environment):

* ``--health-port`` / ``$KNNLM_HEALTH_PORT``: serve answers health in plaintext there, with or
  without TLS on the main port; probed when set (and not 0 or the main port).
* else ``--port`` / ``$KNNLM_PORT`` (default 50051), in plaintext, unless serve uses TLS
  (``--tls-cert``, ``$KNNLM_TLS_CERT`` or ``$KNNLM_TLS_DIR/tls.crt``): a plaintext client cannot
  talk to a TLS port, so then only a TCP connect is checked. Run serve with ``--health-port``
  to get a real check. Tokens do not matter: health is open to callers without one.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Mapping

DEFAULT_PORT = 50051


def _option(argv: list[str], name: str) -> str | None:
    """The last value of ``--name V`` or ``--name=V`` in argv (click takes the last), else None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _is_serve(argv: list[str]) -> bool:
    return "serve" in argv


def serve_port(argv: list[str], env: Mapping[str, str] | None = None) -> int | None:
    """The gRPC port of a ``knnlm-vdb serve`` command line, else None."""
    if not _is_serve(argv):
        return None
    env = {} if env is None else env
    value = _option(argv, "--port") or env.get("KNNLM_PORT")
    return int(value) if value else DEFAULT_PORT


def health_port(argv: list[str], env: Mapping[str, str] | None = None) -> int | None:
    """serve's separate plaintext health port, or None (not serve, unset, 0 = unknown, or the main port)."""
    if not _is_serve(argv):
        return None
    env = {} if env is None else env
    value = _option(argv, "--health-port") or env.get("KNNLM_HEALTH_PORT")
    port = int(value) if value else 0
    return port if port and port != serve_port(argv, env) else None


def uses_tls(argv: list[str], env: Mapping[str, str] | None = None) -> bool:
    """Whether serve's main port speaks TLS (the same sources serve reads its certificate from)."""
    env = {} if env is None else env
    if _option(argv, "--tls-cert") or env.get("KNNLM_TLS_CERT"):
        return True
    tls_dir = env.get("KNNLM_TLS_DIR")
    return bool(tls_dir) and (Path(tls_dir) / "tls.crt").is_file()


def probe(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(port, "grpc" | "tcp") to check for this command line, or None when it is not serve."""
    port = serve_port(argv, env)
    if port is None:
        return None
    hp = health_port(argv, env)
    if hp is not None:
        return hp, "grpc"
    return port, "tcp" if uses_tls(argv, env) else "grpc"


def pid1_argv() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def check(port: int, host: str = "127.0.0.1", timeout: float = 4.0) -> int:
    """0 when grpc.health.v1 answers SERVING at host:port (plaintext), else 1."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def check_tcp(port: int, host: str = "127.0.0.1", timeout: float = 4.0) -> int:
    """0 when host:port accepts a TCP connection, else 1 (TLS without --health-port)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        print(f"unhealthy: port {port}: {e}", file=sys.stderr)
        return 1
    print(f"port {port} accepts connections (TLS: pass serve --health-port for a grpc.health.v1 check)")
    return 0


def main() -> int:
    target = probe(pid1_argv(), os.environ)
    if target is None:
        return 0
    port, how = target
    return check(port) if how == "grpc" else check_tcp(port)


if __name__ == "__main__":
    sys.exit(main())
