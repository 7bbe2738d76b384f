"""gRPC status codes come from ``errors.ERROR_TABLE``, the table that gives the CLI its exit codes.

A real in-process server on 127.0.0.1 with the tiny random Llama and FAISS stores: a typed
library error raised while a request runs (in the request thread, in the batcher's worker or
in a Generate stream) reaches the client with the table's code, and the server keeps serving.
"""
from __future__ import annotations

import grpc
import pytest
from conftest import TINY_TEXT

from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo, create_store
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.errors import ERROR_TABLE, BackendUnavailable, Incompatible, InvalidInput, KnnlmError, NotFound
from knnlm_vdb.ingest import ingest
from knnlm_vdb.service.batcher import ShuttingDown
from knnlm_vdb.service.client import KnnlmClient
from knnlm_vdb.service.scoring import DatastoreUnavailable
from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Limits, Listen
from knnlm_vdb.service.status import DeadlineExceeded, status_of
from knnlm_vdb.service.wire import MalformedRequest

QUERY = "The quick brown fox jumps over the lazy dog. " * 2


class DamagedStore(FaissDatastore):
    """A real FAISS store whose search finds it does not fit the model (as a damaged index would)."""

    def search(self, queries, k):
        raise Incompatible("the index of domain 'damaged' does not fit this model")


@pytest.mark.parametrize("cls", list(ERROR_TABLE))
def test_every_table_class_gets_its_code(cls):
    code, message = status_of(cls("why"))
    assert (code.name, message) == (ERROR_TABLE[cls][1], "why")


@pytest.mark.parametrize("exc, name", [
    (DeadlineExceeded("late"), "DEADLINE_EXCEEDED"), (ShuttingDown("bye"), "UNAVAILABLE"),
    (DatastoreUnavailable(["d"], OSError("disk")), "UNAVAILABLE"), (MalformedRequest("bytes"), "INVALID_ARGUMENT"),
])
def test_service_failures_map_in_the_same_place(exc, name):
    assert status_of(exc)[0].name == name


def test_a_bug_has_no_status():
    assert status_of(ValueError("a bug")) is None


@pytest.fixture(scope="module")
def client(llama_lm, tmp_path_factory):
    encoder = Encoder(llama_lm, ctx=64, stride=32, batch_size=4)
    root = tmp_path_factory.mktemp("status")
    info = StoreInfo.for_encoder(encoder)
    for name in ("plain", "damaged"):
        s = create_store("faiss", str(root / name), info, key_dtype="float32", domain=name)
        ingest(encoder, s, [Document("fox", TINY_TEXT)], domain=name, show_progress=False)
        s.close()
    domains = [Domain("plain", FaissDatastore(root / "plain"), "faiss", "plain", 8, 1.0, 0.25),
               Domain("damaged", DamagedStore(root / "damaged"), "faiss", "damaged", 8, 1.0, 0.25)]
    service = KnnlmService(encoder, domains, Limits(max_text_tokens=1000, max_k=64))
    server = KnnlmServer(service, Listen("127.0.0.1", 0), max_workers=4).start()
    with KnnlmClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c
    server.stop(1.0)


def rpc_code(fn) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code().name, info.value.details()


@pytest.mark.parametrize("call, cls", [
    (lambda c: c.score(QUERY, domains=["plain"], adaptive=True), Incompatible),
    (lambda c: list(c.generate("The quick", domains=["plain"], adaptive=True, max_new_tokens=2)), Incompatible),
    (lambda c: c.score(QUERY, domains=["damaged"]), Incompatible),  # raised in the batcher's worker
    (lambda c: c.next_token("The quick", domains=["damaged"]), Incompatible),
    (lambda c: list(c.generate("The quick", domains=["damaged"], max_new_tokens=2)), Incompatible),
    (lambda c: list(c.generate("The quick", domains=["nope"], max_new_tokens=2)), NotFound),
    (lambda c: c.score(QUERY, domains=["plain"], lmbda=2.0), InvalidInput),
], ids=["adaptive-uncalibrated", "generate-uncalibrated", "score-damaged", "next-damaged", "generate-damaged",
        "generate-unknown", "bad-lambda"])
def test_typed_errors_in_a_request_get_the_table_code(client, call, cls):
    code, details = rpc_code(lambda: call(client))
    assert code == ERROR_TABLE[cls][1], details
    assert "internal error" not in details
    assert client.score(QUERY, domains=["plain"]).scored_tokens > 0  # still serving


def test_table_codes_are_distinct_where_the_cli_differs():
    """The gRPC codes tell a retryable backend failure from a request to fix, as the exit codes do."""
    assert ERROR_TABLE[BackendUnavailable][1] == "UNAVAILABLE" != ERROR_TABLE[KnnlmError][1]
