"""TLS (with a CA made here), token scopes, limits, and secrets kept out of logs.

In-process servers on 127.0.0.1 with the tiny random Llama and a FAISS datastore; the last
test runs ``knnlm-vdb -vv serve`` as a process against Milvus Lite and greps everything it
wrote for the secrets it was given.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from click.testing import CliRunner
from conftest import TINY_TEXT, serve_listening_line

from knnlm_vdb.cli import main
from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo, create_store, open_store
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.ingest import ingest
from knnlm_vdb.service.client import KnnlmClient
from knnlm_vdb.service.security import TokenAuth, server_credentials
from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Limits, Listen

READ, WRITE = "read-token-1f3a9c", "write-token-77b2e0"
TEXT = TINY_TEXT[:150]


# ---- a throwaway PKI --------------------------------------------------------------------------
def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM files: ca; server and client signed by it; other_ca and a stranger client signed by that."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("pki")
    files = {}

    def save(name, cert, key=None):
        files[name] = d / f"{name}.crt"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            files[name + "_key"] = d / f"{name}.key"
            files[name + "_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("knnlm test CA", ca_key, None, None, ca=True)
    other = _cert("someone else's CA", other_key, None, None, ca=True)
    save("ca", ca)
    save("other_ca", other)
    for name, server, issuer, issuer_key in (("server", True, ca, ca_key), ("client", False, ca, ca_key),
                                             ("stranger", False, other, other_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        save(name, _cert(f"knnlm {name}", key, issuer.subject, issuer_key, server=server), key)
    return files


# ---- servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(llama_lm):
    return Encoder(llama_lm, ctx=64, stride=32, batch_size=4)


@pytest.fixture(scope="module")
def store_dir(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("sec") / "code"
    s = create_store("faiss", str(path), StoreInfo.for_encoder(encoder), key_dtype="float32", domain="code")
    ingest(encoder, s, [Document("fox", TINY_TEXT)], domain="code", show_progress=False)
    s.close()
    return path


def start(encoder, store_dir, limits=None, credentials=None, interceptors=(), max_wait_s=0.002, health_port=None):
    domain = Domain("code", open_store("faiss", str(store_dir)), "faiss", "code", 16, 1.0, 0.25)
    service = KnnlmService(encoder, [domain], limits or Limits(max_text_tokens=1000, max_k=64),
                           max_wait_s=max_wait_s)
    listen = Listen("127.0.0.1", 0, credentials, health_port, list(interceptors))
    return KnnlmServer(service, listen, max_workers=8).start()


@pytest.fixture(scope="module")
def tls_server(encoder, store_dir, pki):
    creds = server_credentials(pki["server"], pki["server_key"])
    srv = start(encoder, store_dir, credentials=creds, interceptors=[TokenAuth([READ], [WRITE])], health_port=0)
    yield srv
    srv.stop(1.0)


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    try:
        fn(*args, **kw)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ---- TLS ------------------------------------------------------------------------------------
def test_tls_with_the_right_ca_and_only_then(tls_server, pki):
    target = f"127.0.0.1:{tls_server.port}"
    with KnnlmClient(target, tls_ca=pki["ca"], token=READ, timeout=10) as c:
        assert c.score(TEXT).scored_tokens == len(TEXT) - 1
    with KnnlmClient(target, tls_ca=pki["other_ca"], token=READ, timeout=3) as c:
        assert code_of(c.score, TEXT) == grpc.StatusCode.UNAVAILABLE  # the server's certificate is not trusted
    with KnnlmClient(target, token=READ, timeout=3) as c:
        assert code_of(c.score, TEXT) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port


def test_mutual_tls_needs_a_client_certificate(encoder, store_dir, pki):
    creds = server_credentials(pki["server"], pki["server_key"], pki["ca"])
    srv = start(encoder, store_dir, credentials=creds)
    try:
        target = f"127.0.0.1:{srv.port}"
        with KnnlmClient(target, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"], timeout=10) as c:
            assert c.score(TEXT).scored_tokens == len(TEXT) - 1
        with KnnlmClient(target, tls_ca=pki["ca"], timeout=3) as c:
            assert code_of(c.score, TEXT) == grpc.StatusCode.UNAVAILABLE
        with KnnlmClient(target, tls_ca=pki["ca"], tls_cert=pki["stranger"], tls_key=pki["stranger_key"],
                         timeout=3) as c:  # a client certificate from another CA
            assert code_of(c.score, TEXT) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(1.0)


# ---- tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("token, read_code, write_code", [
    (None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong-token", grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    (READ + "x", grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    (READ, grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED),
    (WRITE, grpc.StatusCode.OK, grpc.StatusCode.OK),
], ids=["none", "wrong", "prefix", "read", "write"])
def test_token_scopes(tls_server, pki, token, read_code, write_code):
    with KnnlmClient(f"127.0.0.1:{tls_server.port}", tls_ca=pki["ca"], token=token, timeout=10) as c:
        assert code_of(c.score, TEXT) == read_code
        assert code_of(c.list_domains) == read_code
        assert code_of(lambda: list(c.generate("The quick", max_new_tokens=2))) == read_code  # a read scope
        assert code_of(c.append, "code", [("doc-" + str(token), "a new document")]) == write_code
        assert c.health() == "SERVING"  # probes need no token


def test_refusals_say_why(tls_server, pki):
    with KnnlmClient(f"127.0.0.1:{tls_server.port}", tls_ca=pki["ca"], token=READ, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.append("code", [("d", "text")])
        assert "write token" in info.value.details()
    with KnnlmClient(f"127.0.0.1:{tls_server.port}", tls_ca=pki["ca"], timeout=10) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.score(TEXT)
        assert "authorization: Bearer" in info.value.details()


def test_plaintext_health_port_answers_only_health(tls_server):
    """Kubelet probes speak neither TLS nor tokens: a separate plaintext port for them alone."""
    assert tls_server.health_port and tls_server.health_port != tls_server.port
    with KnnlmClient(f"127.0.0.1:{tls_server.health_port}", timeout=5) as c:
        assert c.health() == "SERVING"
        assert code_of(c.score, TEXT) == grpc.StatusCode.UNIMPLEMENTED


# ---- limits ---------------------------------------------------------------------------------
def test_limits_return_their_codes(encoder, store_dir):
    srv = start(encoder, store_dir, Limits(max_text_tokens=100, max_k=64, max_request_bytes=16 << 10))
    try:
        with KnnlmClient(f"127.0.0.1:{srv.port}", timeout=10) as c:
            assert code_of(c.score, "y" * (20 << 10)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # message too large
            with pytest.raises(grpc.RpcError) as info:
                c.score("y" * 101)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 100" in info.value.details()
            assert code_of(c.score, "y" * 100) == grpc.StatusCode.OK
    finally:
        srv.stop(1.0)


def test_excess_concurrent_requests_are_refused(encoder, store_dir):
    srv = start(encoder, store_dir, Limits(max_concurrent=2), max_wait_s=1.0)
    try:
        with KnnlmClient(f"127.0.0.1:{srv.port}", timeout=20) as c:
            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(lambda i: code_of(c.score, TEXT), range(6)))
        assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4,
                                                key=str)
        with KnnlmClient(f"127.0.0.1:{srv.port}", timeout=20) as c:
            assert code_of(c.score, TEXT) == grpc.StatusCode.OK  # slots are given back
    finally:
        srv.stop(1.0)


def test_server_deadline_applies_without_a_client_deadline(encoder, store_dir):
    srv = start(encoder, store_dir, Limits(request_timeout_s=0.2), max_wait_s=0.6)
    try:
        with KnnlmClient(f"127.0.0.1:{srv.port}", timeout=None) as c:
            assert code_of(c.score, TEXT) == grpc.StatusCode.DEADLINE_EXCEEDED
        t = time.monotonic() + 10
        while srv.service.batcher.expired == 0 and time.monotonic() < t:  # until the worker has looked at it
            time.sleep(0.01)
        assert (srv.service.batcher.jobs, srv.service.batcher.expired) == (0, 1)
    finally:
        srv.stop(1.0)


# ---- the commands: TLS, tokens from the environment, secrets out of every log ------------------
def _serve_ports(proc, timeout=120.0) -> tuple[int, int]:
    line = serve_listening_line(proc, timeout)
    return int(line.split()[2].rsplit(":", 1)[1]), int(line.rsplit(":", 1)[1])


def test_serve_command_tls_tokens_and_no_secret_in_any_output(tiny_model_dirs, tmp_path, corpus_file, pki,
                                                              monkeypatch):
    secrets = {"KNNLM_MILVUS_TOKEN": "root:milvus-secret-5e1d", "KNNLM_SERVE_TOKEN": "serve-read-secret-93ab",
               "KNNLM_SERVE_WRITE_TOKEN": "serve-write-secret-c402"}
    common = ["--model", tiny_model_dirs["llama"], "--ctx", "64", "--stride", "32"]
    uri = str(tmp_path / "knnlm.db")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KNNLM_")}, **secrets}
    # A process of its own: Milvus Lite locks its file for the process that opened it.
    built = subprocess.run([sys.executable, "-m", "knnlm_vdb", "-vv", "build", *common, "--corpus", str(corpus_file),
                            "--uri", uri, "--domain", "wiki", "--json"], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    cli_outputs = [built.stdout, built.stderr]
    # serve reads the read token from the environment, the Milvus and write tokens from files
    files = {name: tmp_path / name.lower() for name in ("KNNLM_MILVUS_TOKEN", "KNNLM_SERVE_WRITE_TOKEN")}
    for name, path in files.items():
        path.write_text(f"# {name}\n{env.pop(name)}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "knnlm_vdb", "-vv", "serve", *common, "--uri", uri, "--domain", "wiki",
         "--host", "127.0.0.1", "--port", "0", "--health-port", "0",
         "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]),
         "--milvus-token-file", str(files["KNNLM_MILVUS_TOKEN"]),
         "--write-token-file", str(files["KNNLM_SERVE_WRITE_TOKEN"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        port, health_port = _serve_ports(proc)
        target = f"127.0.0.1:{port}"
        with KnnlmClient(f"127.0.0.1:{health_port}", timeout=5) as probe:
            assert probe.health() == "SERVING"
        with KnnlmClient(target, tls_ca=pki["ca"], token="not-" + secrets["KNNLM_SERVE_TOKEN"], timeout=20) as c:
            assert code_of(c.score, TEXT, domains=["wiki"]) == grpc.StatusCode.UNAUTHENTICATED
        with KnnlmClient(target, tls_ca=pki["ca"], token=secrets["KNNLM_SERVE_TOKEN"], timeout=20) as c:
            assert code_of(c.append, "wiki", [("n1", "new text")]) == grpc.StatusCode.PERMISSION_DENIED
        with KnnlmClient(target, tls_ca=pki["ca"], token=secrets["KNNLM_SERVE_WRITE_TOKEN"], timeout=20) as c:
            assert code_of(c.append, "nope", [("n1", "new text")]) == grpc.StatusCode.NOT_FOUND  # past the auth check
            assert c.score(TEXT, domains=["wiki"]).scored_tokens == len(TEXT) - 1  # write implies read
        # the score command: TLS from --tls-ca, the token from the environment
        monkeypatch.setenv("KNNLM_SERVE_TOKEN", secrets["KNNLM_SERVE_TOKEN"])
        f = tmp_path / "q.txt"
        f.write_text(TEXT)
        r = CliRunner().invoke(main, ["score", "--server", target, "--tls-ca", str(pki["ca"]),
                                                      "--domain", "wiki", str(f), "--json"])
        cli_outputs += [r.stdout, r.stderr]
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["tokens"] == len(TEXT) - 1
        monkeypatch.setenv("KNNLM_SERVE_TOKEN", "wrong")
        r = CliRunner().invoke(main, ["score", "--server", target, "--tls-ca", str(pki["ca"]), str(f)])
        cli_outputs += [r.stdout, r.stderr]
        assert r.exit_code == 2 and "UNAUTHENTICATED" in r.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert "DEBUG" in err and "refused /knnlm.v1.Knnlm/Score: unknown token" in err  # the log was verbose
    assert "tokens: 1 read, 1 write" in err  # both token sources were read
    for text in (out, err, *cli_outputs):
        for name, secret in secrets.items():
            assert secret not in text, f"{name} leaked"
            assert secret.split(":")[-1] not in text, f"part of {name} leaked"
