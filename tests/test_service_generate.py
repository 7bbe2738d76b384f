"""The streaming Generate RPC against a real in-process gRPC server (FAISS and Milvus Lite domains)."""
import threading
import time

import grpc
import pytest

from conftest import TINY_TEXT
from knnlm_vdb.api import KnnLM
from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo, create_store, open_store
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.ingest import ingest
from knnlm_vdb.service.client import KnnlmClient
from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Limits, Listen

MEMORISED = "0123456789abcdefghij" * 4
PROMPT = MEMORISED[:25]


@pytest.fixture(scope="module")
def encoder(llama_lm):
    return Encoder(llama_lm, ctx=128, stride=64, batch_size=4)


@pytest.fixture(scope="module")
def stores(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-service")
    info = StoreInfo.for_encoder(encoder)
    made = {}
    for name, backend in (("mem", "faiss"), ("lite", "milvus")):
        if backend == "faiss":
            s = create_store("faiss", str(root / name), info, key_dtype="float32", domain=name)
        else:
            s = create_store("milvus", str(root / "knnlm.db"), info, domain=name)
        ingest(encoder, s, [Document(name, MEMORISED + TINY_TEXT)], domain=name, show_progress=False)
        s.close()
        made[name] = open_store(backend, str(root / name) if backend == "faiss" else str(root / "knnlm.db"),
                                domain=name)
    return made


@pytest.fixture(scope="module")
def server(encoder, stores):
    domains = [Domain(n, s, "faiss" if n == "mem" else "milvus", n, 8, 1.0, 0.5) for n, s in stores.items()]
    service = KnnlmService(encoder, domains, Limits(max_text_tokens=1000, max_k=64, max_new_tokens=300))
    srv = KnnlmServer(service, Listen("127.0.0.1", 0), max_workers=8).start()
    yield srv
    srv.stop(1.0)


@pytest.fixture(scope="module")
def client(server):
    with KnnlmClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.mark.parametrize("domain", ["mem", "lite"])
def test_stream_yields_the_same_tokens_as_the_python_api(client, encoder, stores, domain):
    got = list(client.generate(PROMPT, domains=[domain], max_new_tokens=12, k=8, temperature=1.0, lmbda=0.99))
    want = KnnLM(encoder, [stores[domain]], k=8, temperature=1.0, lmbda=0.99).generate(PROMPT, max_new_tokens=12)
    assert [r.token_id for r in got] == want.token_ids
    assert "".join(r.text for r in got) == want.text == MEMORISED[25:37]
    assert [round(r.prob, 5) for r in got] == [round(s.prob, 5) for s in want.steps]
    assert got[0].settings.lmbda == pytest.approx(0.99) and list(got[0].domains) == [domain]
    assert all(r.searched and 0 < r.knn_prob <= 1 + 1e-9 for r in got)  # float sum of neighbour weights


def test_token_id_prompt_and_stop_sequences(client, encoder):
    ids = encoder.tokenize(PROMPT)
    got = list(client.generate(ids, domains=["mem"], max_new_tokens=20, lmbda=0.99, stop=["9a"]))
    assert "".join(r.text for r in got).startswith("56789a")
    assert len(got) <= 6


def test_neighbours_are_reported_per_token(client):
    got = list(client.generate(PROMPT, domains=["mem"], max_new_tokens=3, lmbda=0.99, neighbours=2))
    for r in got:
        assert len(r.neighbours) == 2
        best = r.neighbours[0]
        assert best.domain == "mem" and best.doc_id == "mem" and best.token_id == r.token_id
        assert best.distance <= r.neighbours[1].distance


@pytest.mark.parametrize("kw,code,words", [
    ({"top_p": 0.0, "do_sample": True}, grpc.StatusCode.INVALID_ARGUMENT, ["top_p"]),
    ({"top_p": 1.5, "do_sample": True}, grpc.StatusCode.INVALID_ARGUMENT, ["top_p"]),
    ({"max_new_tokens": 301}, grpc.StatusCode.INVALID_ARGUMENT, ["max_new_tokens", "300"]),
    ({"temperature_lm": -1.0, "do_sample": True}, grpc.StatusCode.INVALID_ARGUMENT, ["temperature"]),
    ({"lmbda": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, ["lmbda"]),
    ({"domains": ["nope"]}, grpc.StatusCode.NOT_FOUND, ["nope"]),
    ({"adaptive": True}, grpc.StatusCode.FAILED_PRECONDITION, ["calibration"]),
])
def test_bad_parameters_get_clear_status_codes(client, kw, code, words):
    kw = {"domains": ["mem"], **kw}
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(PROMPT, **kw))
    assert info.value.code() == code
    assert all(w in info.value.details() for w in words)


def test_empty_prompt_is_invalid(client):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate("", domains=["mem"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelling_a_stream_stops_the_servers_decoding(client, server):
    """After the client cancels, the model is free again well before 300 tokens could be decoded."""
    stream = client.generate(PROMPT, domains=["mem"], max_new_tokens=300, lmbda=0.5)
    next(stream)
    stream.close()  # cancels the call
    lock = server.service.batcher.lock
    deadline = time.monotonic() + 30
    while not lock.acquire(blocking=False):
        assert time.monotonic() < deadline, "the server kept decoding after the client cancelled"
        time.sleep(0.05)
    lock.release()
    # and the server still answers
    assert len(list(client.generate(PROMPT, domains=["mem"], max_new_tokens=2, lmbda=0.99))) == 2


def test_concurrent_generations_take_turns(client):
    out = {}

    def run(i):
        out[i] = "".join(r.text for r in client.generate(PROMPT, domains=["mem"], max_new_tokens=6, lmbda=0.99))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(out.values()) == [MEMORISED[25:31]] * 3
