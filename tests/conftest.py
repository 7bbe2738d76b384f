"""Shared fixtures: tiny random-weight LMs with a byte-level tokenizer, saved to disk.

Nothing here downloads anything; models are built from configs with a fixed seed.
"""
from __future__ import annotations

import os

# Tiny models gain nothing from threads, and oversubscribed cores make torch crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "A kNN language model remembers every context it has seen. "
    "def add(a, b):\n    return a + b\n"
) * 6


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_model(arch: str, vocab_size: int = 257, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        return LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, n_embd=32, n_layer=2, n_head=4, n_positions=512)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "neox":
        cfg = GPTNeoXConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=512)
        return GPTNeoXForCausalLM(cfg).eval()
    raise ValueError(arch)


# What a synthetic store claims to be built with (tests that fill stores with random keys).
STORE_DIM = 16


def store_info():
    from knnlm_vdb.datastore import StoreInfo

    return StoreInfo(model="tiny-test", key_type="ffn_input", dim=STORE_DIM, tokenizer="tok-abc", vocab_size=257)


def server_database(server_uri: str):
    """A fresh database on the shared server; yields its URI and drops it afterwards."""
    import uuid

    from pymilvus import MilvusClient

    name = f"t{uuid.uuid4().hex[:12]}"
    admin = MilvusClient(uri=server_uri)
    admin.create_database(name)
    try:
        yield f"{server_uri}/{name}"
    finally:
        c = MilvusClient(uri=f"{server_uri}/{name}")
        for coll in c.list_collections():  # dropping a collection also drops its aliases
            c.drop_collection(coll)
        c.close()
        admin.drop_database(name)
        admin.close()


def docs_file(path, n_docs, seed=0, words=40):
    """A JSONL corpus of ``n_docs`` random-word documents."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(vocab, words))}) + "\n")
    return path


def serve_listening_line(proc, timeout=120.0) -> str:
    """Wait for a `knnlm-vdb serve` subprocess to print its 'listening on HOST:PORT ...' line."""
    import threading

    lines, done = [], threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("listening on"):
                break
        done.set()  # started, or exited

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    if not (lines and lines[-1].startswith("listening on")):
        proc.kill()
        raise AssertionError("serve did not start: " + "".join(lines) + proc.stderr.read()[-3000:])
    return lines[-1]


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session", params=["llama", "gpt2", "neox"])
def any_lm(request, tokenizer):
    from knnlm_vdb.lm import from_objects

    return from_objects(tiny_model(request.param), tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def llama_lm(tokenizer):
    from knnlm_vdb.lm import from_objects

    return from_objects(tiny_model("llama"), tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def fox_store(llama_lm, tmp_path_factory):
    """(encoder with short windows, a FAISS store of TINY_TEXT as document "fox" in domain "fox")."""
    from knnlm_vdb.corpus import Document
    from knnlm_vdb.datastore import StoreInfo, create_store
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.ingest import ingest

    encoder = Encoder(llama_lm, ctx=32, stride=16, batch_size=4)
    store = create_store("faiss", str(tmp_path_factory.mktemp("fox") / "ds"), StoreInfo.for_encoder(encoder),
                         key_dtype="float32", domain="fox")
    ingest(encoder, store, [Document("fox", TINY_TEXT)], domain="fox", show_progress=False)
    yield encoder, store
    store.close()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer):
    """Two saved tiny models on disk (``--model DIR``): a Llama and a GPT-2 of the same vocabulary."""
    dirs = {}
    for arch in ("llama", "gpt2"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        tiny_model(arch).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[arch] = str(d)
    return dirs


@pytest.fixture(params=["lite", "server"])
def uri(request, tmp_path):
    """A Milvus database of the test's own: a fresh Milvus Lite file, or a fresh database on the
    session's server (so a test that fakes a schema version disturbs no other)."""
    if request.param == "lite":
        yield str(tmp_path / "knnlm.db")
    else:
        yield from server_database(request.getfixturevalue("milvus_server").uri)


@pytest.fixture()
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TINY_TEXT)
    return p


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone server (PyPI ``milvus``) for the whole session, on a free port.

    Never skipped when CI=true: a server that does not start fails the tests that need it.
    Locally, KNNLM_SKIP_MILVUS_SERVER=1 skips them instead.
    """
    import os

    from milvus_server import MilvusTestServer

    if os.environ.get("KNNLM_SKIP_MILVUS_SERVER") and os.environ.get("CI", "").lower() != "true":
        pytest.skip("KNNLM_SKIP_MILVUS_SERVER is set")
    # Strong reads wait for the next time tick (200 ms by default): a faster tick keeps tests quick
    server = MilvusTestServer(tmp_path_factory.mktemp("milvus-server"), settings={"proxy.timeTickInterval": 50})
    try:
        server.start()
    except Exception as exc:
        pytest.fail(f"the Milvus test server did not start: {exc}\n{server.log_tail()}", pytrace=False)
    pid = server.pid
    yield server
    server.stop()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        pytest.fail(f"the Milvus test server (pid {pid}) is still running after stop()", pytrace=False)
