"""Start and stop a real Milvus standalone server (the PyPI ``milvus`` package) for tests.

The server is a single process listening on a free port with its data in a temporary
directory. ``stop()`` also runs at interpreter exit, so an aborted test session does not
leave a server behind.
"""
from __future__ import annotations

import atexit
import logging
import socket
import time

log = logging.getLogger(__name__)

# Milvus 2.3 grpc servers bind every interface (no listen-address setting); pointing each
# component's advertised address at loopback keeps their traffic on 127.0.0.1.
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusTestServer:
    """``milvus.default_server`` in ``base_dir``; ``uri`` is set once it answers health checks."""

    def __init__(self, base_dir: str, port: int | None = None):
        self.base_dir = str(base_dir)
        self.port = port or free_port()
        self.uri: str | None = None
        self.startup_seconds: float | None = None
        self._server = None

    def start(self, timeout_s: float = 120.0) -> str:
        from milvus import default_server

        server = default_server
        server.set_base_dir(self.base_dir)
        server.config.update(proxy_port=self.port)  # the other ports are picked free by the package
        for component in _COMPONENTS:
            server.config.set(f"{component}.ip", "127.0.0.1")
        server.wait_for_started = False
        t = time.perf_counter()
        self._server = server
        atexit.register(self.stop)
        server.start()
        try:
            server.wait_started(timeout=int(timeout_s * 1000))
        except Exception:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - t
        self.uri = f"http://127.0.0.1:{server.listen_port}"
        log.info("Milvus server at %s (pid %s) started in %.1fs", self.uri, server.server_proc.pid,
                 self.startup_seconds)
        return self.uri

    @property
    def pid(self) -> int | None:
        proc = self._server.server_proc if self._server is not None else None
        return proc.pid if proc is not None else None

    def log_tail(self, n: int = 40) -> str:
        from pathlib import Path

        lines = []
        for name in ("milvus-stdout.log", "milvus-stderr.log"):
            p = Path(self.base_dir) / "logs" / name
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def stop(self) -> None:
        """Terminate the server process and wait for it to exit."""
        server, self._server = self._server, None
        if server is None:
            return
        proc = server.server_proc
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except Exception:
                proc.kill()
                proc.wait(timeout=15)
        server.stop()  # closes its log files; the process is already gone
