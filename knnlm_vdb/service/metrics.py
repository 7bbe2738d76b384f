"""Prometheus metrics of the scoring service: every metric is defined here, once.

Each ``KnnlmService`` gets its own ``Metrics`` (its own registry, so several servers in one
process, as in the tests, do not collide); ``serve --metrics-port`` exposes it over HTTP in the
Prometheus text format. The README's "Metrics" section lists them and what to alert on.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PREFIX = "knnlm_"
# request latency: a tiny Score on a warm CPU is ~10 ms, a long text at k=1024 on Milvus Lite a minute
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def backend_of(store) -> str:
    """The ``backend`` label of a datastore: faiss, milvus_lite or milvus (a server)."""
    deployment = getattr(store, "deployment", None)
    if deployment is None:
        return "faiss"
    return "milvus_lite" if deployment == "lite" else "milvus"


class Metrics:
    """The service's counters, gauges and histograms (names in the module doc of the README)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "Knnlm RPCs finished, by method and gRPC status code "
                                "(errors: code != OK)", ["rpc", "code"], registry=r)
        self.latency = Histogram(PREFIX + "request_seconds", "Knnlm RPC latency, admission to answer, by method",
                                 ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "Knnlm RPCs admitted and not finished", registry=r)
        self.tokens = Counter(PREFIX + "tokens_scored", "tokens scored by Score", registry=r)
        self.searches = Counter(PREFIX + "searches", "per-token datastore queries, by outcome: searched, or "
                                "skipped by adaptive λ's pre-search gate", ["outcome"], registry=r)
        self.batch_jobs = Histogram(PREFIX + "batch_jobs", "requests per batch (one LM forward, one search)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_wait = Histogram(PREFIX + "batch_wait_seconds", "time a request waited in the queue before "
                                    "its batch ran", buckets=WAIT_BUCKETS, registry=r)
        self.expired = Counter(PREFIX + "jobs_expired", "requests dropped uncomputed: deadline passed or caller gone",
                               registry=r)
        self.search_latency = Histogram(PREFIX + "datastore_search_seconds", "one batched datastore search, by "
                                        "backend", ["backend"], buckets=SEARCH_BUCKETS, registry=r)
        self.datastore_errors = Counter(PREFIX + "datastore_errors", "datastore (FAISS, Milvus) operations that "
                                        "failed, by backend and operation", ["backend", "op"], registry=r)
        for outcome in ("searched", "skipped"):  # exported at 0 before the first request
            self.searches.labels(outcome)

    def request(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.latency.labels(rpc).observe(seconds)

    def job_done(self, job) -> None:
        """Tokens and searches of a finished Score/NextToken job (``scoring.Job``)."""
        if job.scores_text and job.base is not None:
            self.tokens.inc(len(job.base))
        if job.searched is not None:
            searched = int(job.searched.sum())
            self.searches.labels("searched").inc(searched)
            self.searches.labels("skipped").inc(len(job.searched) - searched)

    @contextmanager
    def search(self, stores):
        """Time one datastore search; count it as an error of its backend if it raises."""
        backend = "+".join(sorted({backend_of(s) for s in stores}))
        t0 = time.perf_counter()
        try:
            yield
        except Exception:
            self.datastore_errors.labels(backend, "search").inc()
            raise
        self.search_latency.labels(backend).observe(time.perf_counter() - t0)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose the metrics at ``http://host:port/metrics`` (any path answers); -> the bound port.
        ``host`` may be written as gRPC does (``[::]``)."""
        server, _ = start_http_server(port, addr=host.strip("[]") or "0.0.0.0", registry=self.registry)
        bound = server.server_address[1]
        log.info("metrics on :%d", bound)
        self._http = server
        return bound

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
