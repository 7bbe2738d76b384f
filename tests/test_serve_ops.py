"""Operating the service: Prometheus metrics on --metrics-port, `serve` without --domain serving
every domain of its database, and the client's deadline agreeing with the server's cap."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import grpc
import pytest
from click.testing import CliRunner
from conftest import TINY_TEXT

from knnlm_vdb.cli import main
from knnlm_vdb.datastore import StoreInfo, create_store, entry_ids
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.service.client import KnnlmClient
from knnlm_vdb.service.metrics import Metrics
from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Limits, Listen

WIN = ["--ctx", "64", "--stride", "32"]


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def _sample(text: str, name: str, **labels) -> float | None:
    """The value of one sample in the Prometheus text format, or None when absent."""
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
            if all(got.get(k) == str(v) for k, v in labels.items()):
                return float(m[3])
    return None


@pytest.fixture(scope="module")
def metrics_server(llama_lm, tmp_path_factory):
    encoder = Encoder(llama_lm, ctx=64, stride=32, batch_size=4)
    store = create_store("faiss", str(tmp_path_factory.mktemp("m") / "code"), StoreInfo.for_encoder(encoder),
                         key_dtype="float32", domain="code")
    for block in encoder.encode(encoder.tokenize(TINY_TEXT), with_logprobs=False):
        store.add(entry_ids("code", "d", block.positions), block.keys, block.targets,
                  doc_ids=["d"] * len(block), positions=block.positions)
    store.flush()
    service = KnnlmService(encoder, [Domain("code", store, "faiss", "code", 16, 1.0, 0.25)],
                           Limits(max_text_tokens=1000, max_k=64), metrics=Metrics())
    server = KnnlmServer(service, Listen("127.0.0.1", 0)).start()
    port = service.metrics.serve_http(0, "127.0.0.1")
    yield server, port
    server.stop(1.0)


def test_metrics_count_a_score_and_its_latency(metrics_server):
    server, port = metrics_server
    before = _metrics_text(port)
    assert _sample(before, "knnlm_requests_total", rpc="Score", code="OK") is None
    with KnnlmClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        r = c.score(TINY_TEXT[:200], domains=["code"])
        with pytest.raises(grpc.RpcError) as err:
            c.score(TINY_TEXT[:50], domains=["nope"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    text = _metrics_text(port)
    assert _sample(text, "knnlm_requests_total", rpc="Score", code="OK") == 1
    assert _sample(text, "knnlm_requests_total", rpc="Score", code="NOT_FOUND") == 1
    assert _sample(text, "knnlm_request_seconds_count", rpc="Score") == 2
    assert _sample(text, "knnlm_request_seconds_sum", rpc="Score") > 0
    assert _sample(text, "knnlm_request_seconds_bucket", rpc="Score", le="+Inf") == 2
    assert _sample(text, "knnlm_tokens_scored_total") == r.scored_tokens == 199
    assert _sample(text, "knnlm_searches_total", outcome="searched") == 199  # fixed λ: every token searched
    assert _sample(text, "knnlm_searches_total", outcome="skipped") == 0
    assert _sample(text, "knnlm_batch_jobs_count") == 1 and _sample(text, "knnlm_batch_wait_seconds_count") == 1
    assert _sample(text, "knnlm_datastore_search_seconds_count", backend="faiss") == 1
    assert _sample(text, "knnlm_requests_in_flight") == 0


def test_every_metric_is_documented():
    """The README's metrics table names exactly what metrics.py defines."""
    names = {m.name for m in Metrics().registry.collect()}
    assert names == {"knnlm_requests", "knnlm_request_seconds", "knnlm_requests_in_flight", "knnlm_tokens_scored",
                     "knnlm_searches", "knnlm_batch_jobs", "knnlm_batch_wait_seconds", "knnlm_jobs_expired",
                     "knnlm_datastore_search_seconds", "knnlm_datastore_errors"}


def test_client_deadline_is_the_server_cap():
    """score's --timeout and serve's --request-timeout: one default, one environment variable."""
    params = lambda cmd: {p.name: p for p in main.get_command(None, cmd).params}
    serve, score = params("serve")["request_timeout"], params("score")["timeout"]
    assert serve.default == score.default and serve.envvar == score.envvar == "KNNLM_REQUEST_TIMEOUT"


def test_serve_without_domain_serves_every_domain(tiny_model_dirs, tmp_path, corpus_file):
    """`serve --uri x.db` (no --domain) serves every domain there, says so, and exposes metrics;
    ``--mirror`` reads them through in-process copies (datastore/milvus/mirror.py)."""
    model = ["--model", tiny_model_dirs["llama"], *WIN]
    uri = str(tmp_path / "k.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNNLM_")}
    for domain, index in (("docs", []), ("code", ["--index", "FLAT"])):
        p = subprocess.run([sys.executable, "-m", "knnlm_vdb", "build", *model, "--uri", uri, "--domain", domain,
                            "--corpus", str(corpus_file), "--json", *index], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        # Milvus Lite brute-forces FLAT: a new Lite domain is HNSW unless --index says otherwise
        assert json.loads(p.stdout)["datastore"]["index"]["type"] == ("FLAT" if index else "HNSW")
    proc = subprocess.Popen([sys.executable, "-m", "knnlm_vdb", "serve", *model, "--uri", uri, "--host", "127.0.0.1",
                             "--port", "0", "--insecure", "--metrics-port", "0", "--mirror"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    head = []
    try:
        for line in proc.stdout:  # serve prints its domains, then the metrics port, then "listening on"
            head.append(line)
            if line.startswith("listening on"):
                break
        assert head and head[-1].startswith("listening on"), "".join(head)
        port = int(head[-1].split()[2].rsplit(":", 1)[1])
        with KnnlmClient(f"127.0.0.1:{port}", timeout=60) as c:
            assert sorted(d.name for d in c.list_domains()) == ["code", "docs"]
            # an untuned Milvus Lite domain: the Lite default k
            assert {d.settings.k for d in c.list_domains()} == {128}
            r = c.score(TINY_TEXT[:100])  # no domain: every served domain
            assert sorted(r.domains) == ["code", "docs"]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    out = "".join(head) + out
    assert re.search(r"^domain code \(\d[\d,]* entries\): k=128 T=1.0 λ=0.25$", out, re.M), out
    assert "metrics on http://127.0.0.1:" in out


def test_serve_without_domain_refuses_an_empty_database(tiny_model_dirs, tmp_path):
    r = CliRunner().invoke(main, ["serve", "--model", tiny_model_dirs["llama"], "--uri", str(tmp_path / "none.db"),
                                  "--insecure", "--port", "0"])
    assert r.exit_code == 2 and "no Milvus Lite database" in r.output, r.output


def test_verbose_after_the_subcommand_and_envvars_in_help(tmp_path):
    for args in (["-vv", "domains", "list"], ["domains", "list", "-vv"], ["domains", "-v", "list", "-v"],
                 ["domains", "list", "--verbose", "--verbose"]):
        assert main.make_context("knnlm-vdb", list(args)).params["verbose"] == 2, args
    text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert "[env var: KNNLM_REQUEST_TIMEOUT; default: 60.0]" in text and "[env var: KNNLM_METRICS_PORT]" in text
    assert "[env var: KNNLM_LAMBDA]" in text
    assert "env var: KNNLM_URI" in " ".join(CliRunner().invoke(main, ["domains", "list", "--help"]).output.split())


def test_unreachable_server_exits_3(tmp_path):
    """score against nothing: BackendUnavailable, exit 3, so a Job's podFailurePolicy can retry it."""
    (tmp_path / "t.txt").write_text(TINY_TEXT)
    r = CliRunner().invoke(main, ["score", "--server", "127.0.0.1:1", "--timeout", "5", str(tmp_path / "t.txt")])
    assert r.exit_code == 3 and "UNAVAILABLE" in r.output, r.output
