"""The gRPC service against a real server on 127.0.0.1 (ephemeral port), the tiny random
Llama, a FAISS datastore and Milvus Lite domains.

Most tests share one in-process server; the SIGTERM test runs ``knnlm-vdb serve`` as a
process, as a deployment would.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_TEXT, serve_listening_line

from knnlm_vdb.adaptive import Calibration, fit_calibration
from knnlm_vdb.api import KnnLM
from knnlm_vdb.cli import main, resolve_knn_settings
from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo, create_store, entry_ids, open_store
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.evaluate import evaluate
from knnlm_vdb.knn import interpolate, knn_distribution
from knnlm_vdb.service import knnlm_pb2 as pb
from knnlm_vdb.service.client import KnnlmClient
from knnlm_vdb.service.server import SERVICE_NAME, Domain, KnnlmServer, KnnlmService, Limits, Listen

ROOT = Path(__file__).resolve().parents[1]
SERVICE_DIR = ROOT / "knnlm_vdb" / "service"
TRAIN = [Document("fox", TINY_TEXT), Document("code", "def mul(a, b):\n    return a * b\n" * 8)]
QUERY = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n" * 2
NEW_TEXT = "Milvus keeps every vector of the appended notes; kNN-LM recalls them verbatim. " * 4
SETTINGS = {"k": 16, "temperature": 10.0, "lmbda": 0.4}
LIMITS = Limits(max_text_tokens=1000, max_k=64, max_concurrent=32)


@pytest.fixture(scope="module")
def encoder(llama_lm):
    return Encoder(llama_lm, ctx=64, stride=32, batch_size=4)


def fill(store, encoder, docs, domain):
    """The rows ``ingest`` would add (Milvus has no ingest ledger yet, so fixtures add rows directly)."""
    for doc in docs:
        for block in encoder.encode(encoder.tokenize(doc.text), with_logprobs=False):
            store.add(entry_ids(domain, doc.doc_id, block.positions), block.keys, block.targets,
                      doc_ids=[doc.doc_id] * len(block), positions=block.positions)
    store.flush()


FAISS_DOMAINS = ("code", "notes", "scratch", "tuned")
ALL_DOMAINS = ("code", "wiki", "notes", "mnotes", "scratch", "tuned")


@pytest.fixture(scope="module")
def stores(encoder, tmp_path_factory):
    """FAISS: code, notes (empty), scratch; Milvus Lite: wiki (the same rows as code), mnotes (empty)."""
    root = tmp_path_factory.mktemp("service")
    info = StoreInfo.for_encoder(encoder)
    uri = str(root / "knnlm.db")
    made = {}
    for name in ALL_DOMAINS:
        if name in FAISS_DOMAINS:
            s = create_store("faiss", str(root / name), info, key_dtype="float32", domain=name)
        else:
            s = create_store("milvus", uri, info, domain=name)
        if name not in ("notes", "mnotes"):
            fill(s, encoder, TRAIN, name)
        if name == "tuned":  # what `knnlm-vdb tune` stores: a fixed setting and an adaptive-λ calibration
            valid = evaluate(encoder, encoder.tokenize(TINY_TEXT[::-1]), [s], k=32, keep_neighbours=True,
                             show_progress=False)
            cal, _ = fit_calibration(valid.neighbours, 16, 10.0)
            s.set_extra("tuned", {"k": 16, "temperature": 10.0, "lambda": 0.3})
            s.set_extra("calibration", cal.to_dict())
        s.close()
        made[name] = open_store("faiss", str(root / name)) if name in FAISS_DOMAINS else open_store("milvus", uri, name)
    return made


def start(encoder, stores, names=ALL_DOMAINS, limits=LIMITS, **kw) -> KnnlmServer:
    domains = [Domain(n, stores[n], "faiss" if n in FAISS_DOMAINS else "milvus", n, 32, 1.0, 0.25) for n in names]
    for d in domains:
        if "calibration" in d.store.info.extra:  # as serve resolves a tuned domain's defaults
            d.k, d.temperature, d.lmbda, _ = resolve_knn_settings([d.store], None, None, 0.3)
            d.calibration = Calibration.from_dict(d.store.info.extra["calibration"])
    service = KnnlmService(encoder, domains, limits, **kw)
    return KnnlmServer(service, Listen("127.0.0.1", 0), max_workers=16).start()


@pytest.fixture(scope="module")
def server(encoder, stores):
    srv = start(encoder, stores)
    yield srv
    srv.stop(1.0)


@pytest.fixture(scope="module")
def client(server):
    with KnnlmClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def wait_for(condition, timeout: float = 10.0) -> None:
    t = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < t, "timed out"
        time.sleep(0.01)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


# ---- the API --------------------------------------------------------------------------------
def test_committed_stubs_match_the_proto(tmp_path, monkeypatch):
    from grpc_tools import protoc

    monkeypatch.chdir(ROOT)
    rc = protoc.main(["protoc", "-I.", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", "knnlm_vdb/service/knnlm.proto"])
    assert rc == 0
    for name in ("knnlm_pb2.py", "knnlm_pb2.pyi", "knnlm_pb2_grpc.py"):
        fresh = (tmp_path / "knnlm_vdb" / "service" / name).read_text()
        assert fresh == (SERVICE_DIR / name).read_text(), f"{name} is stale: regenerate (see knnlm_vdb/service/__init__.py)"


def test_health_and_reflection(server, client):
    assert client.health("") == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in reply.list_services_response.service}
    assert {"knnlm.v1.Knnlm", "grpc.health.v1.Health"} <= names


def test_list_domains(client, stores):
    got = {d.name: d for d in client.list_domains()}
    assert list(got) == list(ALL_DOMAINS)
    assert got["code"].backend == "faiss" and got["wiki"].backend == "milvus"
    assert got["code"].count == stores["code"].count() > 0 and got["wiki"].count == got["code"].count
    assert got["wiki"].settings.k == 32 and got["wiki"].settings.lmbda == pytest.approx(0.25)


@pytest.mark.parametrize("domains", [["code"], ["wiki"], ["code", "wiki"]])
def test_score_equals_offline_evaluate(client, encoder, stores, domains):
    ids = encoder.tokenize(QUERY)
    assert len(ids) > 2 * encoder.ctx  # several sliding windows
    r = client.score(QUERY, domains=domains, **SETTINGS)
    offline = evaluate(encoder, ids, [stores[d] for d in domains], k=SETTINGS["k"],
                       temperature=SETTINGS["temperature"], lmbda=SETTINGS["lmbda"], show_progress=False)
    assert list(r.token_ids) == ids and len(r.tokens) == len(ids) and "".join(r.tokens) == QUERY
    assert r.scored_tokens == offline.tokens == len(ids) - 1 == len(r.logprobs) == len(r.knn_logprobs)
    assert r.base_ppl == pytest.approx(offline.base_ppl, rel=1e-4)
    assert r.knnlm_ppl == pytest.approx(offline.knnlm_ppl, rel=1e-4)
    assert r.knnlm_ppl < r.base_ppl  # the datastore holds this text's n-grams
    mixed = interpolate(r.base_logprobs, r.knn_logprobs, SETTINGS["lmbda"])
    np.testing.assert_allclose(r.logprobs, mixed, rtol=1e-5, atol=1e-5)
    assert list(r.domains) == domains and r.settings.k == SETTINGS["k"]


@pytest.mark.parametrize("domains", [["code"], ["code", "wiki"]])
def test_score_reports_each_tokens_neighbours_as_the_python_api_does(client, encoder, stores, domains):
    """A Score request's `neighbours` flag: the nearest entries of every scored token, over all its domains."""
    r = client.score(QUERY, domains=domains, neighbours=3, k=8, temperature=1.0, lmbda=0.25)
    want = KnnLM(encoder, [stores[d] for d in domains], k=8, temperature=1.0, lmbda=0.25).score(QUERY, neighbours=3)
    assert len(r.neighbours) == r.scored_tokens == len(want.neighbours)
    for got, hits in zip(r.neighbours, want.neighbours):
        assert [(e.domain, e.doc_id, e.position, e.token_id) for e in got.entries] == \
            [(h["domain"], h["doc_id"], h["position"], h["target"]) for h in hits]
        assert [e.distance for e in got.entries] == pytest.approx([h["distance"] for h in hits], rel=1e-4, abs=1e-4)
    assert not client.score(QUERY, domains=domains).neighbours  # off unless asked for


def test_score_defaults_come_from_the_domain(client):
    r = client.score(QUERY[:200], domains=["wiki"])
    assert (r.settings.k, r.settings.temperature, r.settings.lmbda) == (32, 1.0, 0.25)


def test_adaptive_lambda_equals_offline_evaluate(client, encoder, stores):
    """A calibrated domain defaults to per-token λ, exactly as `eval` does with its calibration."""
    cal = Calibration.from_dict(stores["tuned"].info.extra["calibration"])
    ids = encoder.tokenize(QUERY)
    r = client.score(QUERY, domains=["tuned"])
    offline = evaluate(encoder, ids, [stores["tuned"]], calibration=cal, show_progress=False)
    assert r.settings.adaptive and (r.settings.k, r.settings.temperature) == (cal.k, cal.temperature)
    assert r.knnlm_ppl == pytest.approx(offline.knnlm_ppl, rel=1e-4)
    assert r.searched_fraction == pytest.approx(offline.settings["searched_fraction"])
    assert len(r.lambdas) == r.scored_tokens and np.mean(r.lambdas) == pytest.approx(offline.settings["mean_lambda"],
                                                                                      rel=1e-4)
    assert r.settings.lmbda == pytest.approx(np.mean(r.lambdas), rel=1e-5)
    fixed = client.score(QUERY, domains=["tuned"], k=16)  # setting k: the tuned fixed λ, no calibration
    assert not fixed.settings.adaptive and fixed.settings.lmbda == pytest.approx(0.3) and not fixed.lambdas
    assert fixed.knnlm_ppl == pytest.approx(evaluate(encoder, ids, [stores["tuned"]], k=16, temperature=10.0,
                                                     lmbda=0.3, show_progress=False).knnlm_ppl, rel=1e-4)
    nt = client.next_token("def add(a, b):", top_n=3, domains=["tuned"])
    assert nt.settings.adaptive and 0.0 <= nt.settings.lmbda <= cal.post.lambda_max
    tuned = next(d for d in client.list_domains() if d.name == "tuned")
    assert tuned.settings.adaptive and tuned.settings.k == cal.k


def test_adaptive_lambda_over_two_domains_equals_offline_evaluate(encoder, stores, tmp_path):
    """Several calibrated domains: each weighed by its own evidence, online as offline."""
    other = create_store("faiss", str(tmp_path / "other"), StoreInfo.for_encoder(encoder), key_dtype="float32",
                         domain="other")
    fill(other, encoder, [Document("new", NEW_TEXT)], "other")
    valid = evaluate(encoder, encoder.tokenize(NEW_TEXT[::-1]), [other], k=32, keep_neighbours=True,
                     show_progress=False)
    other.set_extra("calibration", fit_calibration(valid.neighbours, 8, 5.0)[0].to_dict())
    srv = start(encoder, {**stores, "other": other}, names=["tuned", "other", "code"])
    try:
        with KnnlmClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
            r = c.score(QUERY, domains=["tuned", "other"])
            uncalibrated = rpc_error(c.score, QUERY, domains=["tuned", "code"], adaptive=True)
            nt = c.next_token("def add(a, b):", top_n=3, domains=["tuned", "other"])
    finally:
        srv.stop(1.0)
    cals = [Calibration.from_dict(s.info.extra["calibration"]) for s in (stores["tuned"], other)]
    offline = evaluate(encoder, encoder.tokenize(QUERY), [stores["tuned"], other], calibration=cals,
                       show_progress=False)
    assert r.settings.adaptive and r.knnlm_ppl == pytest.approx(offline.knnlm_ppl, rel=1e-4)
    assert np.mean(r.lambdas) == pytest.approx(offline.settings["mean_lambda"], rel=1e-4)
    assert uncalibrated.code() == grpc.StatusCode.FAILED_PRECONDITION and "'code'" in uncalibrated.details()
    assert nt.settings.adaptive and len(nt.candidates) == 3 and abs(sum(c.prob for c in nt.candidates)) <= 1.0


def test_next_token_matches_the_offline_mixture(client, encoder, stores):
    context = "def add(a, b):\n    return a "
    r = client.next_token(context, top_n=5, domains=["code"], **SETTINGS)
    key, lm = encoder.next_token(encoder.tokenize(context))
    dist, vals = stores["code"].search(key[None], SETTINGS["k"])
    knn = knn_distribution(dist[0], vals[0], len(lm), SETTINGS["temperature"])
    mixed = np.exp(interpolate(lm, knn, SETTINGS["lmbda"]))
    expected = np.argsort(-mixed, kind="stable")[:5]
    assert [c.token_id for c in r.candidates] == expected.tolist()
    probs = [c.prob for c in r.candidates]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    for c in r.candidates:
        assert c.prob == pytest.approx(mixed[c.token_id], rel=1e-4)
        assert c.prob == pytest.approx((1 - SETTINGS["lmbda"]) * c.base_prob + SETTINGS["lmbda"] * c.knn_prob, rel=1e-6)
    assert r.candidates[0].token == encoder.lm.tokenizer.decode([r.candidates[0].token_id])


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("call, code, words", [
    (lambda c: c.score(QUERY, domains=["nope"]), grpc.StatusCode.NOT_FOUND, ["nope", "code, wiki"]),
    (lambda c: c.next_token("x", domains=["code", "nope"]), grpc.StatusCode.NOT_FOUND, ["nope"]),
    (lambda c: c.score(""), grpc.StatusCode.INVALID_ARGUMENT, ["empty"]),
    (lambda c: c.score("   \n"), grpc.StatusCode.INVALID_ARGUMENT, ["empty"]),
    (lambda c: c.score("a"), grpc.StatusCode.INVALID_ARGUMENT, ["at least 2"]),
    (lambda c: c.score(QUERY, lmbda=1.5), grpc.StatusCode.INVALID_ARGUMENT, ["[0, 1]", "1.5"]),
    (lambda c: c.score(QUERY, lmbda=-0.1), grpc.StatusCode.INVALID_ARGUMENT, ["[0, 1]"]),
    (lambda c: c.score(QUERY, k=0), grpc.StatusCode.INVALID_ARGUMENT, ["[1, 64]"]),
    (lambda c: c.score(QUERY, k=65), grpc.StatusCode.INVALID_ARGUMENT, ["--max-k", "65"]),
    (lambda c: c.score(QUERY, temperature=0.0), grpc.StatusCode.INVALID_ARGUMENT, ["temperature"]),
    (lambda c: c.score("x" * 1001), grpc.StatusCode.INVALID_ARGUMENT, ["1001 tokens", "limit of 1000", "--max-text-tokens"]),
    (lambda c: c.score("x" * 70_000), grpc.StatusCode.INVALID_ARGUMENT, ["limit of 1000"]),
    (lambda c: c.next_token("x", top_n=5000), grpc.StatusCode.INVALID_ARGUMENT, ["top_n", "1000"]),
    (lambda c: c.score(QUERY, neighbours=65), grpc.StatusCode.INVALID_ARGUMENT, ["neighbours", "64"]),
    (lambda c: c.score(QUERY, domains=["code"], adaptive=True), grpc.StatusCode.FAILED_PRECONDITION,
     ["no adaptive-λ calibration", "knnlm-vdb tune"]),
    (lambda c: c.score(QUERY, domains=["tuned"], adaptive=True, k=8), grpc.StatusCode.INVALID_ARGUMENT,
     ["leave k, temperature and lmbda unset"]),
    (lambda c: c.append("notes", [("", "text")]), grpc.StatusCode.INVALID_ARGUMENT, ["needs an id"]),
    (lambda c: c.append("notes", [("x" * 1025, "text")]), grpc.StatusCode.INVALID_ARGUMENT, ["1024 bytes"]),
    (lambda c: c.append("", [("d", "text")]), grpc.StatusCode.INVALID_ARGUMENT, ["name a domain"]),
    (lambda c: c.append("nope", [("d", "text")]), grpc.StatusCode.NOT_FOUND, ["nope"]),
    (lambda c: c.append("notes", []), grpc.StatusCode.INVALID_ARGUMENT, ["no documents"]),
], ids=["domain", "domain-next", "empty", "blank", "one-token", "lambda-high", "lambda-low", "k-0", "k-high",
        "temperature", "too-long", "way-too-long", "top-n", "neighbours", "uncalibrated", "adaptive-and-k", "doc-id", "doc-id-long", "append-domain", "append-unknown", "append-none"])
def test_bad_input_gets_its_code_and_the_server_keeps_serving(client, call, code, words):
    err = rpc_error(call, client)
    assert err.code() == code, err.details()
    for w in words:
        assert w in err.details()
    assert client.health() == "SERVING"
    assert client.score(QUERY[:50], domains=["code"]).scored_tokens == 49


def test_datastore_failure_is_unavailable(client, stores):
    """A datastore whose files vanished (an unmounted volume): writes fail, the server keeps serving."""
    shutil.rmtree(stores["scratch"].path)
    err = rpc_error(client.append, "scratch", [("gone", NEW_TEXT)])
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "datastore for domain(s) scratch is unavailable" in err.details()
    # nothing searched scratch before (serve would have loaded its index at startup): the search fails too
    err = rpc_error(client.score, QUERY, domains=["code", "scratch"])
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "code, scratch" in err.details()
    assert client.score(QUERY[:50], domains=["code"]).scored_tokens == 49


# ---- load, append, deadlines, shutdown --------------------------------------------------------
def test_concurrent_load_has_no_errors_and_is_batched(client, server):
    texts = [QUERY[i:i + 40 + 7 * i] for i in range(25)]
    before_jobs, before_batches = server.service.batcher.jobs, server.service.batcher.batches

    def one_client(c: int):
        with KnnlmClient(f"127.0.0.1:{server.port}", timeout=30) as own:
            out = []
            for i in range(25):
                if (c + i) % 4 == 0:
                    r = own.next_token(texts[i], top_n=3, domains=["code", "wiki"])
                    out.append(len(r.candidates) == 3)
                else:
                    r = own.score(texts[i], domains=["wiki"] if c % 2 else ["code"], k=8)
                    out.append(r.scored_tokens == len(texts[i]) - 1 and np.isfinite(r.knnlm_ppl))
            return out

    with ThreadPoolExecutor(8) as pool:
        results = [ok for oks in pool.map(one_client, range(8)) for ok in oks]
    assert len(results) == 200 and all(results)
    jobs = server.service.batcher.jobs - before_jobs
    batches = server.service.batcher.batches - before_batches
    assert jobs == 200 and batches < jobs  # concurrent requests shared forward passes


@pytest.mark.parametrize("domain", ["notes", "mnotes"], ids=["faiss", "milvus"])
def test_append_then_score_sees_the_new_documents(client, encoder, stores, domain):
    before = client.score(NEW_TEXT, domains=[domain], lmbda=0.5)
    r = client.append(domain, [("note-1", NEW_TEXT), Document("note-2", "short note")])
    n_note1 = len(encoder.tokenize(NEW_TEXT)) - 1
    n_new = n_note1 + len(encoder.tokenize("short note")) - 1
    assert (r.documents, r.tokens, r.added, r.skipped, r.count) == (2, n_new, n_new, 0, n_new)
    after = client.score(NEW_TEXT, domains=[domain], lmbda=0.5)
    assert after.knnlm_ppl < 0.7 * before.knnlm_ppl
    assert after.base_ppl == pytest.approx(before.base_ppl, rel=1e-5)
    again = client.append(domain, [("note-1", NEW_TEXT)])
    assert (again.added, again.count) == (0, n_new)  # appending is idempotent
    changed = client.append(domain, [("note-2", "another short note")])
    assert list(changed.changed) == ["note-2"] and changed.added == 0
    replaced = client.append(domain, [("note-2", "another short note")], replace=True)
    assert list(replaced.replaced) == ["note-2"] and replaced.count == n_note1 + len("another short note") - 1


def test_expired_request_is_not_computed(encoder, stores, server):
    slow = start(encoder, stores, names=("code",), max_wait_s=0.8)
    try:
        with KnnlmClient(f"127.0.0.1:{slow.port}") as c:
            err = rpc_error(c.score, QUERY[:100], timeout=0.3)  # expires inside the batch window
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: slow.service.batcher.expired == 1)  # the worker looked at the job, and dropped it
            assert (slow.service.batcher.jobs, slow.service.batcher.expired) == (0, 1)
            assert c.score(QUERY[:100], timeout=5).scored_tokens == 99
            assert slow.service.batcher.jobs == 1
    finally:
        slow.stop(1.0)


def test_stop_drains_in_flight_requests(encoder, stores, server):
    slow = start(encoder, stores, names=("code",), max_wait_s=0.4)
    with KnnlmClient(f"127.0.0.1:{slow.port}", timeout=10) as c:
        in_flight = c.stub.Score.future(pb.ScoreRequest(text=QUERY[:100]), timeout=10)
        wait_for(lambda: slow.service.in_flight == 1)  # the request is waiting for its batch
        stopper = threading.Thread(target=slow.stop, args=(5.0,))
        stopper.start()
        assert in_flight.result().scored_tokens == 99  # finished, not aborted
        stopper.join(5)
        assert not stopper.is_alive()
        err = rpc_error(c.score, QUERY[:100], timeout=2)
        assert err.code() == grpc.StatusCode.UNAVAILABLE


# ---- the commands ---------------------------------------------------------------------------
def test_score_command_json(client, server, tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"id": "a", "text": QUERY}) + "\n" + json.dumps({"id": "b", "text": NEW_TEXT[:90]}) + "\n")
    r = CliRunner().invoke(main, ["score", "--server", f"127.0.0.1:{server.port}", "--domain", "code", "--k", "16",
                                  str(f), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    a, b = (client.score(t, domains=["code"], k=16) for t in (QUERY, NEW_TEXT[:90]))
    assert out["tokens"] == a.scored_tokens + b.scored_tokens and out["documents"] == 2
    nll = -(np.sum(a.logprobs) + np.sum(b.logprobs)) / out["tokens"]
    assert out["knnlm_ppl"] == pytest.approx(np.exp(nll), rel=1e-5)
    assert out["base_ppl"] > out["knnlm_ppl"] and out["k"] == 16 and out["domains"] == ["code"]
    bad = CliRunner().invoke(main, ["score", "--server", f"127.0.0.1:{server.port}", "--domain", "nope", str(f)])
    assert bad.exit_code == 2 and "NOT_FOUND" in bad.output and "nope" in bad.output


def _read_listening_port(proc, timeout=120.0) -> int:
    """The port from serve's 'listening on HOST:PORT' line."""
    return int(serve_listening_line(proc, timeout).split()[2].rsplit(":", 1)[1])


def test_serve_command_drains_on_sigterm(tiny_model_dirs, tmp_path, corpus_file):
    model = tiny_model_dirs["llama"]
    common = ["--model", model, "--ctx", "64", "--stride", "32"]
    ds = tmp_path / "docs"
    built = CliRunner().invoke(main, ["build", *common, "--corpus", str(corpus_file), "--out", str(ds), "--json"])
    assert built.exit_code == 0, built.output
    refused = CliRunner().invoke(main, ["serve", *common, "--datastore", str(ds), "--port", "0"])
    assert refused.exit_code == 2 and "--insecure" in refused.output  # no TLS, no tokens: refuses to start
    env = {k: v for k, v in os.environ.items() if not k.startswith("KNNLM_")}
    proc = subprocess.Popen([sys.executable, "-m", "knnlm_vdb", "serve", *common, "--datastore", str(ds),
                             "--host", "127.0.0.1", "--port", "0", "--insecure", "--batch-wait-ms", "1000",
                             "--grace", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        port = _read_listening_port(proc)
        with KnnlmClient(f"127.0.0.1:{port}", timeout=20) as c:
            assert [d.name for d in c.list_domains()] == ["docs"]  # a FAISS domain is named by its directory
            in_flight = c.stub.Score.future(pb.ScoreRequest(text=TINY_TEXT[:120], domains=["docs"]), timeout=20)
            time.sleep(0.3)  # inside the 1 s batch window
            proc.send_signal(signal.SIGTERM)
            assert in_flight.result().scored_tokens == 119
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert "stopping: draining" in out and out.rstrip().endswith("stopped")
    assert "WARNING" in err and "--insecure" in err
