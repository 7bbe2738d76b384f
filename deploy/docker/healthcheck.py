#!/usr/bin/env python3
"""Docker HEALTHCHECK for the knnlm-vdb image.

When the container runs ``knnlm-vdb serve``, ask its grpc.health.v1 service (overall status,
service "") on the port given by ``--port`` (default 50051) and exit 0 only for SERVING.
Any other command (build, append, migrate, ...) is a batch run: exit 0.
Kubernetes ignores this and uses the chart's native gRPC probes.
"""
from __future__ import annotations

import sys

DEFAULT_PORT = 50051


def serve_port(argv: list[str]) -> int | None:
    """The gRPC port of a ``knnlm-vdb serve`` command line, else None."""
    if "serve" not in argv:
        return None
    port = DEFAULT_PORT
    for i, a in enumerate(argv):
        if a == "--port" and i + 1 < len(argv):
            port = int(argv[i + 1])
        elif a.startswith("--port="):
            port = int(a.split("=", 1)[1])
    return port


def pid1_argv() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def check(port: int, host: str = "127.0.0.1", timeout: float = 4.0) -> int:
    """0 when grpc.health.v1 answers SERVING at host:port, else 1."""
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


def main() -> int:
    port = serve_port(pid1_argv())
    return 0 if port is None else check(port)


if __name__ == "__main__":
    sys.exit(main())
