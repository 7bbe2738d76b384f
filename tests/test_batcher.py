"""``service.batcher.Batcher`` on its own: concurrent submits share a batch, a deadline that
passes drops the job uncomputed, a closed batcher refuses. A real ``Scorer`` on the tiny Llama
and a real FAISS store; the batch's hold-up is a second lock holder, not a fake scorer."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from knnlm_vdb.errors import BackendUnavailable
from knnlm_vdb.service.batcher import Batcher, DeadlineExceeded, ShuttingDown
from knnlm_vdb.service.scoring import Job, Scorer


@pytest.fixture(scope="module")
def parts(fox_store):
    return fox_store


def job(encoder, store, text="The quick brown fox") -> Job:
    return Job(token_ids=encoder.tokenize(text), domains=("fox",), stores=(store,), k=8, temperature=2.0, lmbda=0.3)


@pytest.fixture()
def batcher(parts):
    b = Batcher(Scorer(parts[0]), max_batch=8, max_wait_s=0.05)
    yield b
    b.close(5.0)


def test_concurrent_submits_share_a_batch(parts, batcher):
    encoder, store = parts
    n = 6
    texts = ["The quick brown fox jumps over"[:10 + 3 * i] for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        with batcher.lock:  # the worker holds its first batch at the lock; later submits queue meanwhile
            futures = [pool.submit(batcher.submit, job(encoder, store, t), 30.0) for t in texts]
            threading.Event().wait(0.3)  # every submit has queued (no timing is asserted)
        jobs = [f.result(30) for f in futures]
    assert batcher.jobs == n and batcher.batches <= 2  # the held batch, then everything that queued behind it
    alone = batcher.submit(job(encoder, store, texts[-1]), 30.0)
    for j in jobs:
        assert j.mixed is not None and len(j.mixed) == len(j.token_ids) - 1
    assert jobs[-1].mixed.tolist() == pytest.approx(alone.mixed.tolist(), rel=1e-4, abs=1e-4)


def test_deadline_passed_is_not_computed(parts, batcher):
    encoder, store = parts
    with batcher.lock:  # the batch cannot run before the deadline passes
        with pytest.raises(DeadlineExceeded):
            batcher.submit(job(encoder, store), timeout=0.05)
    batcher.submit(job(encoder, store), timeout=30.0)  # the next request is served
    assert batcher.expired == 1 and batcher.jobs == 1


def test_closed_batcher_refuses(parts):
    encoder, store = parts
    b = Batcher(Scorer(encoder), max_batch=4, max_wait_s=0.0)
    assert b.close(5.0) and b.closed
    with pytest.raises(ShuttingDown) as info:
        b.submit(job(encoder, store), timeout=1.0)
    assert isinstance(info.value, BackendUnavailable)  # UNAVAILABLE by errors.ERROR_TABLE: retry elsewhere


def test_close_answers_queued_jobs(parts):
    encoder, store = parts
    b = Batcher(Scorer(encoder), max_batch=1, max_wait_s=0.0)
    with b.lock:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(b.submit, job(encoder, store), 30.0) for _ in range(3)]
            threading.Event().wait(0.3)  # one job is held at the lock, two are queued
            stopped = b.close(0.1)  # the held batch cannot finish: abandoned, its caller answered too
            errors = []
            for f in futures:
                with pytest.raises(ShuttingDown) as info:
                    f.result(30)
                errors.append(info.value)
    assert not stopped and len(errors) == 3  # nobody is left waiting
