"""benchmarks/compress.py keeps a stored form's row only when it was measured with the options
that change that form: --nprobe for Milvus forms, --train-rows for FAISS ones."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def compress():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("compress")
    finally:
        sys.path.remove(str(BENCH))


def test_a_row_is_kept_only_for_the_options_that_measured_it(compress):
    server, faiss = "server:pca192+IVF_PQ24", "pca128+pq32"
    assert compress.build_options(server, 32, 10000) == {"nprobe": 32}
    assert compress.build_options(faiss, 32, 10000) == {"train_rows": 10000}
    assert compress.build_options("flat", 8, 5) == {}
    row = {"form": server, "build": compress.build_options(server, 64, 10000)}
    assert compress.kept(row) == {"nprobe": 64} != compress.build_options(server, 32, 10000)
    assert compress.kept(row) == compress.build_options(server, 64, 999)  # train_rows does not touch a Milvus form
    # rows from before the options were recorded were measured with the defaults
    assert compress.kept({"form": server}) == {"nprobe": 32}
    assert compress.kept({"form": faiss}) == {"train_rows": 10000}
