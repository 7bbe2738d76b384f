"""Start and stop a real Milvus standalone server (the PyPI ``milvus`` package) for tests and benchmarks.

The package's ``default_server`` always runs its embedded etcd on 2379/2380, so a second
server on the same machine (a benchmark next to a test run) fails to start. Here the server
gets its own template with an embedded-etcd config file, and every port is a free one.
Its data lives in ``base_dir``; ``stop()`` also runs at interpreter exit, so an aborted
session does not leave a server behind.
"""
from __future__ import annotations

import atexit
import logging
import socket
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

# Milvus 2.3 grpc servers bind every interface (there is no listen-address setting); pointing
# each component's advertised address at loopback keeps their traffic on 127.0.0.1.
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
_FATAL = ("address already in use", "panic:", "failed to init embedded Etcd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusTestServer:
    """A Milvus standalone process in ``base_dir``; ``uri`` is set once it answers health checks."""

    def __init__(self, base_dir: str | Path, port: int | None = None, settings: dict | None = None):
        """``settings``: extra Milvus config values by dotted key, e.g. ``{"proxy.timeTickInterval": 50}``."""
        self.base_dir = Path(base_dir).resolve()  # the server and its etcd.yaml path must not depend on cwd
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self.uri: str | None = None
        self.startup_seconds: float | None = None
        self._server = None

    def _config(self):
        """The package's config template plus ``etcd.config.path``, so etcd's ports are ours too."""
        import milvus

        template = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text()
        marker = "etcd:\n"
        if marker not in template:
            raise RuntimeError("unexpected milvus config template: no top-level etcd section")
        template = template.replace(marker, marker + "  config:\n    path: {{ etcd_config_path }}\n", 1)
        conf_dir = self.base_dir / "knnlm"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "milvus.yaml.template").write_text(template)
        client_port, peer_port = free_port(), free_port()
        peer = f"http://127.0.0.1:{peer_port}"
        (conf_dir / "etcd.yaml").write_text(
            "name: knnlm-test\n"
            f"listen-client-urls: http://127.0.0.1:{client_port}\n"
            f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
            f"listen-peer-urls: {peer}\n"
            f"initial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: knnlm-test={peer}\n")
        config = milvus.MilvusServerConfig(template=str(conf_dir / "milvus.yaml.template"))
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")  # set only for the default template
        config.update(proxy_port=self.port, etcd_port=client_port)
        config.set("etcd_config_path", str(conf_dir / "etcd.yaml"))
        for component in _COMPONENTS:
            config.set(f"{component}.ip", "127.0.0.1")
        for key, value in self.settings.items():
            config.set(key, value)
        return config

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the server and wait until it is healthy; raise at once if it dies or cannot bind."""
        import milvus

        t = time.perf_counter()
        server = milvus.MilvusServer(self._config(), wait_for_started=False)
        server.set_base_dir(str(self.base_dir))
        self._server = server
        atexit.register(self.stop)
        server.start()
        try:
            self._wait_healthy(server, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - t
        self.uri = f"http://127.0.0.1:{server.listen_port}"
        log.info("Milvus server at %s (pid %s) started in %.1fs", self.uri, self.pid, self.startup_seconds)
        return self.uri

    def _wait_healthy(self, server, timeout_s: float) -> None:
        health = f"http://127.0.0.1:{server.webservice_port}/healthz"
        deadline = time.monotonic() + timeout_s
        next_log_check = 0.0
        while time.monotonic() < deadline:
            rc = server.server_proc.poll()
            if rc is not None:
                raise RuntimeError(f"Milvus exited with status {rc} while starting")
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if b"OK" in resp.read():
                        return
            except OSError:
                pass
            if time.monotonic() > next_log_check:  # a server that failed to bind hangs instead of exiting
                tail = self.log_tail(200)
                bad = next((line for line in tail.splitlines() if any(f in line for f in _FATAL)), None)
                if bad:
                    raise RuntimeError(f"Milvus failed while starting: {bad[:300]}")
                next_log_check = time.monotonic() + 2
            time.sleep(0.25)
        raise TimeoutError(f"Milvus did not become healthy within {timeout_s:.0f}s")

    @property
    def pid(self) -> int | None:
        proc = self._server.server_proc if self._server is not None else None
        return proc.pid if proc is not None else None

    def log_tail(self, n: int = 40) -> str:
        lines = []
        for name in ("milvus-stdout.log", "milvus-stderr.log"):
            p = self.base_dir / "logs" / name
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def stop(self) -> None:
        """Terminate the server process and wait for it to exit (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        proc = server.server_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:  # a graceful stop can take minutes; test data is disposable
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait(timeout=20)
        server.stop()  # closes its log files; the process is already gone
