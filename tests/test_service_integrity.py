"""Service hardening (issue 16): malformed bytes, write scope, plaintext tokens, shutdown within --grace."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from click.testing import CliRunner
from conftest import TINY_TEXT, serve_listening_line
from test_security import encoder, store_dir  # noqa: F401  (module fixtures: a tiny LM and a FAISS domain "code")

from knnlm_vdb.cli import main
from knnlm_vdb.datastore import open_store
from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.service import commands
from knnlm_vdb.service import knnlm_pb2 as pb
from knnlm_vdb.service.client import KnnlmClient
from knnlm_vdb.service.security import TokenAuth
from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Limits, Listen

READ, WRITE = "read-token-4c1d", "write-token-9e7a"


def start(encoder, store_dir, interceptors=()):
    domain = Domain("code", open_store("faiss", str(store_dir)), "faiss", "code", 16, 1.0, 0.25)
    service = KnnlmService(encoder, [domain], Limits(max_text_tokens=1000, max_k=64))
    return KnnlmServer(service, Listen("127.0.0.1", 0, None, None, list(interceptors)), max_workers=4).start()


def test_malformed_bytes_are_invalid_argument_without_a_traceback_per_message(encoder, store_dir, caplog):
    srv = start(encoder, store_dir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch, caplog.at_level(logging.WARNING):
            score = ch.unary_unary("/knnlm.v1.Knnlm/Score")  # raw bytes in, raw bytes out
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as info:
                    score(b"\xff\xff\xff\xff", timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "malformed protobuf" in info.value.details()
            append = ch.stream_unary("/knnlm.v1.Knnlm/Append")
            good = pb.AppendRequest(domain="code", document=pb.Document(id="x", text="a b c")).SerializeToString()
            with pytest.raises(grpc.RpcError) as info:
                append(iter([b"\x0a\xff\xff", good]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            ok = ch.unary_unary("/knnlm.v1.Knnlm/ListDomains")(b"", timeout=10)  # the server is fine
            assert pb.ListDomainsResponse.FromString(ok).domains[0].name == "code"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
        assert 1 <= len(malformed) <= 2, [r.getMessage() for r in malformed]  # rate-limited, not one per message
        assert open_store("faiss", str(store_dir)).ledger().get("x") is None  # nothing of the bad stream stored
    finally:
        srv.stop(1.0)


@pytest.mark.parametrize("allow", [False, True])
def test_append_needs_a_write_token_whenever_tokens_are_configured(encoder, store_dir, allow, tmp_path):
    import shutil

    ds = tmp_path / "code"
    shutil.copytree(store_dir, ds)
    srv = start(encoder, ds, interceptors=[TokenAuth([READ], [], allow_read_token_writes=allow)])
    try:
        with KnnlmClient(f"127.0.0.1:{srv.port}", token=READ, timeout=30) as c:
            assert c.list_domains()[0].name == "code"  # reading is fine
            if allow:
                assert c.append("code", [("new", "a new document of a few words")]).documents == 1
            else:
                with pytest.raises(grpc.RpcError) as info:
                    c.append("code", [("new", "a new document of a few words")])
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "--allow-read-token-writes" in info.value.details()
    finally:
        srv.stop(1.0)


def test_bearer_tokens_over_plaintext_need_insecure(monkeypatch):
    monkeypatch.setenv("KNNLM_SERVE_TOKEN", READ)
    for var in ("KNNLM_SERVE_WRITE_TOKEN", "KNNLM_TLS_DIR", "KNNLM_AUTH_DIR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InvalidInput, match="bearer tokens over plaintext"):
        commands._security(None, None, None, None, None, False)
    creds, interceptors = commands._security(None, None, None, None, None, True)
    assert creds is None and len(interceptors) == 1


def test_serve_exits_within_grace_of_sigterm_under_load(tiny_model_dirs, tmp_path, corpus_file):
    """Queued requests are refused at shutdown and a running batch is not waited for past --grace."""
    common = ["--model", tiny_model_dirs["llama"], "--ctx", "64", "--stride", "8"]
    ds = tmp_path / "docs"
    built = CliRunner().invoke(main, ["build", *common, "--corpus", str(corpus_file), "--out", str(ds)])
    assert built.exit_code == 0, built.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNNLM_")}
    grace = 1.0
    proc = subprocess.Popen([sys.executable, "-m", "knnlm_vdb", "serve", *common, "--datastore", str(ds),
                             "--host", "127.0.0.1", "--port", "0", "--insecure", "--max-batch", "4",
                             "--max-workers", "64", "--max-concurrent", "64", "--grace", str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        port = int(serve_listening_line(proc, 120).split()[2].rsplit(":", 1)[1])
        with KnnlmClient(f"127.0.0.1:{port}", timeout=120) as c:
            text = (TINY_TEXT * 8)[:900]  # stride 8: ~110 windows per request, so each batch takes a while
            calls = [c.stub.Score.future(pb.ScoreRequest(text=text), timeout=120) for _ in range(48)]
            time.sleep(1.0)  # the first batches run, the rest queue
            assert sum(f.done() for f in calls) < len(calls) // 2, "not under load: make the requests heavier"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            took = time.monotonic() - t0
            codes = {f.exception().code() if f.exception() else grpc.StatusCode.OK for f in calls}
        assert took <= grace + 2.0, f"serve took {took:.1f}s to exit after SIGTERM with --grace {grace}"
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    finally:
        if proc.poll() is None:
            proc.kill()
