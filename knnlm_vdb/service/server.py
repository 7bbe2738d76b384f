"""The gRPC server: the ``knnlm.v1.Knnlm`` servicer, health, reflection, limits and shutdown.

The model and the datastores are loaded once, before the server starts; request threads
only validate, queue a job on the batcher and wait. Every failure becomes a status code
a client can act on, and none takes the server down:

  unknown domain                                   NOT_FOUND
  empty text, λ/k/T/top_n out of range, too long   INVALID_ARGUMENT (naming the limit)
  adaptive λ asked of an uncalibrated domain       FAILED_PRECONDITION
  more requests in flight than --max-concurrent    RESOURCE_EXHAUSTED
  the deadline passed before the batch ran         DEADLINE_EXCEEDED (the job is dropped, not computed)
  a datastore failing (network, server, disk)      UNAVAILABLE
  shutting down                                    UNAVAILABLE
  anything else (a bug)                            INTERNAL, logged with its traceback

The library's typed errors take their code from ``errors.ERROR_TABLE`` (``status.status_of``),
the same table that gives the CLI its exit codes.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from knnlm_vdb.corpus import Document
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.ingest import ingest
from knnlm_vdb.service import knnlm_pb2 as pb
from knnlm_vdb.service import knnlm_pb2_grpc as pb_grpc
from knnlm_vdb.errors import Incompatible, KnnlmError, NotFound
from knnlm_vdb.service.batcher import Batcher
from knnlm_vdb.service.generation import GenerateRpc, cache_of, neighbour_message
from knnlm_vdb.service.limits import Limits
from knnlm_vdb.service.metrics import Metrics, backend_of
from knnlm_vdb.service.scoring import DatastoreUnavailable, Job, Scorer
from knnlm_vdb.service.wire import add_servicer
from knnlm_vdb.service.status import DeadlineExceeded, RequestError, invalid, status_of

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Knnlm"].full_name  # knnlm.v1.Knnlm
DEFAULT_TOP_N = 10
MAX_DOC_ID_BYTES = 1024  # what every backend can store (Milvus: VARCHAR(1024))

__all__ = ["Domain", "KnnlmServer", "KnnlmService", "Limits", "Listen", "SERVICE_NAME"]


@dataclass
@dataclass
class Domain:
    """A served domain: its store, the domain name its entry ids use, and its default k/T/λ.

    With a ``calibration`` (adaptive.Calibration, from ``tune``) the default is adaptive λ with
    the calibration's k and T, and ``lmbda`` is the fixed λ used when a request sets k, T or λ.
    """

    name: str
    store: object
    backend: str
    ingest_domain: str
    k: int
    temperature: float
    lmbda: float
    calibration: object = None
    cache: object = None  # the in-document cache's calibration, mixed in with adaptive λ (serve --cache)


_invalid = invalid


def _rpc(method):
    """Admission (the concurrency limit) and the mapping of failures to status codes."""

    @functools.wraps(method)
    def wrapper(self: "KnnlmService", request, context):
        if not self._slots.acquire(blocking=False):
            self.metrics.request(method.__name__, "RESOURCE_EXHAUSTED", 0.0)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server is at its limit of {self.limits.max_concurrent} concurrent requests "
                          f"(--max-concurrent); retry with backoff")
        self.in_flight += 1  # under the GIL; a gauge, not an invariant
        self.metrics.in_flight.inc()
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except (RequestError, KnnlmError) as exc:  # expected failures: the code from errors.ERROR_TABLE
            code, message = status_of(exc)
            if isinstance(exc, DatastoreUnavailable):
                self._datastore_error(exc, method.__name__)
        except Exception:  # a bug, never control flow
            log.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log"
        finally:
            self.in_flight -= 1
            self._slots.release()
            self.metrics.in_flight.dec()
            self.metrics.request(method.__name__, code.name, time.perf_counter() - t0)
            log.debug("%s %s in %.1f ms", method.__name__, code.name, 1e3 * (time.perf_counter() - t0))
        context.abort(code, message)

    return wrapper


class KnnlmService(GenerateRpc, pb_grpc.KnnlmServicer):
    """Validates requests and hands the work to the batcher (Score, NextToken) or ingest (Append)."""

    def __init__(self, encoder: Encoder, domains: list[Domain], limits: Limits | None = None,
                 max_batch: int = 32, max_wait_s: float = 0.005, metrics: Metrics | None = None):
        if not domains:
            raise ValueError("a server needs at least one domain")
        self.encoder = encoder
        self.domains = {d.name: d for d in domains}
        self.limits = limits or Limits()
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self.in_flight = 0  # Knnlm requests admitted and not finished
        self.metrics = metrics or Metrics()
        self.batcher = Batcher(Scorer(encoder, metrics=self.metrics), max_batch=max_batch, max_wait_s=max_wait_s,
                               metrics=self.metrics)
        self._token_text: dict[int, str] = {}

    # ---- request parsing ----------------------------------------------------------------------
    def _domains(self, names) -> list[Domain]:
        names = list(dict.fromkeys(names)) or list(self.domains)  # none: every served domain
        unknown = [n for n in names if n not in self.domains]
        if unknown:
            raise NotFound(f"unknown domain {unknown[0]!r}; this server serves: {', '.join(self.domains)}")
        return [self.domains[n] for n in names]

    def _settings(self, s: pb.KnnSettings, domains: list[Domain]) -> tuple[int, float, float | None, tuple | None]:
        """-> (k, T, fixed λ or None, one calibration per domain or None), as ``resolve_knn_settings``
        decides offline: adaptive λ by default when every requested domain has a calibration."""
        first = domains[0]
        fixed = s.HasField("k") or s.HasField("temperature") or s.HasField("lmbda")
        missing = [d.name for d in domains if d.calibration is None]
        calibrations = tuple(d.calibration for d in domains)
        if s.HasField("adaptive") and s.adaptive:
            if fixed:
                raise _invalid("adaptive λ uses the calibration's k and T: leave k, temperature and lmbda unset")
            if missing:
                raise Incompatible(f"domain {missing[0]!r} has no adaptive-λ calibration; run `knnlm-vdb tune` on it")
            return first.calibration.k, first.calibration.temperature, None, calibrations
        if not fixed and not missing and not s.HasField("adaptive"):
            return first.calibration.k, first.calibration.temperature, None, calibrations
        k = s.k if s.HasField("k") else first.k
        temperature = s.temperature if s.HasField("temperature") else first.temperature
        lmbda = s.lmbda if s.HasField("lmbda") else first.lmbda
        if not 1 <= k <= self.limits.max_k:
            raise _invalid(f"k must be in [1, {self.limits.max_k}] (the server's --max-k), got {k}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise _invalid(f"temperature must be positive, got {temperature}")
        if not 0.0 <= lmbda <= 1.0:
            raise _invalid(f"lmbda (λ) must be in [0, 1], got {lmbda}")
        return k, temperature, lmbda, None

    def _tokens(self, text: str, what: str, minimum: int) -> list[int]:
        if not text.strip():
            raise _invalid(f"{what} is empty")
        limit = self.limits.max_text_tokens
        if len(text) > 64 * limit:  # no tokenizer gives 64 characters per token: refuse before tokenizing
            raise _invalid(f"{what} is longer than the limit of {limit} tokens (--max-text-tokens)")
        ids = self.encoder.tokenize(text)
        if len(ids) > limit:
            raise _invalid(f"{what} has {len(ids)} tokens, more than the limit of {limit} (--max-text-tokens)")
        if len(ids) < minimum:
            raise _invalid(f"{what} has {len(ids)} token(s); at least {minimum} are needed")
        return ids

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        cap = self.limits.request_timeout_s
        return cap if remaining is None else min(remaining, cap)

    def _datastore_error(self, exc: DatastoreUnavailable, rpc: str) -> None:
        """Count a datastore failure by backend; search failures were counted where they happened."""
        if rpc != "Append" and rpc != "ListDomains":
            return
        for name in exc.domains:
            d = self.domains.get(name)
            if d is not None:
                self.metrics.datastore_errors.labels(backend_of(d.store), "append" if rpc == "Append" else "count").inc()

    def _token_str(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.encoder.lm.tokenizer.decode([token_id])
        return s

    def _job(self, ids, domains: list[Domain], settings, top_n: int = 0) -> Job:
        k, temperature, lmbda, calibrations = self._settings(settings, domains)
        return Job(token_ids=ids, domains=tuple(d.name for d in domains), stores=tuple(d.store for d in domains),
                   k=k, temperature=temperature, lmbda=lmbda, top_n=top_n, calibrations=calibrations,
                   cache=cache_of(domains) if calibrations is not None else None)

    @staticmethod
    def _used(job: Job) -> pb.KnnSettings:
        lmbda = float(np.mean(job.lambdas)) if job.adaptive else job.lmbda
        return pb.KnnSettings(k=job.k, temperature=job.temperature, lmbda=lmbda, adaptive=job.adaptive)

    # ---- RPCs ---------------------------------------------------------------------------------
    @_rpc
    def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        from knnlm_vdb.api import neighbour_count, provenance

        domains = self._domains(request.domains)
        n = neighbour_count(request.neighbours)
        ids = self._tokens(request.text, "text", minimum=2)
        job = self._job(ids, domains, request.settings)
        job.keep_keys = n > 0
        job = self.batcher.submit(job, timeout=self._timeout(context))
        self.metrics.job_done(job)
        near = provenance(job.stores, self.encoder.lm.tokenizer, n)(job.keys) if n else []
        return pb.ScoreResponse(
            neighbours=[pb.TokenNeighbours(entries=[neighbour_message(h) for h in hits]) for hits in near],
            token_ids=ids, tokens=[self._token_str(i) for i in ids],
            base_logprobs=job.base.tolist(), knn_logprobs=job.knn.tolist(), logprobs=job.mixed.tolist(),
            scored_tokens=len(job.base), base_ppl=job.base_ppl, knnlm_ppl=job.knnlm_ppl,
            settings=self._used(job), domains=job.domains,
            lambdas=job.lambdas.tolist() if job.adaptive else [],
            searched_fraction=float(job.searched.mean()))

    @_rpc
    def NextToken(self, request: pb.NextTokenRequest, context) -> pb.NextTokenResponse:
        top_n = request.top_n or DEFAULT_TOP_N
        if top_n > self.limits.max_top_n:
            raise _invalid(f"top_n must be at most {self.limits.max_top_n}, got {top_n}")
        domains = self._domains(request.domains)
        ids = self._tokens(request.context, "context", minimum=1)
        job = self.batcher.submit(self._job(ids, domains, request.settings, top_n=top_n),
                                  timeout=self._timeout(context))
        self.metrics.job_done(job)
        mixed, base, knn = (np.exp(a[job.top]) for a in (job.mixed, job.base, job.knn))
        return pb.NextTokenResponse(
            candidates=[pb.TokenProbability(token_id=int(t), token=self._token_str(int(t)), prob=m, base_prob=b,
                                            knn_prob=n) for t, m, b, n in zip(job.top, mixed, base, knn)],
            settings=self._used(job), domains=job.domains)

    @_rpc
    def Append(self, request_iterator, context) -> pb.AppendResponse:
        deadline = time.monotonic() + self._timeout(context)
        domain, replace = None, False
        report = {"documents": 0, "tokens": 0, "added": 0, "skipped": 0, "changed": [], "replaced": []}
        for req in request_iterator:
            if domain is None:
                if not req.domain:
                    raise _invalid("the first Append message must name a domain")
                (domain,) = self._domains([req.domain])
                replace = req.replace
            elif req.domain and req.domain != domain.name:
                raise _invalid(f"one Append stream writes one domain: got {req.domain!r} after {domain.name!r}")
            doc = req.document
            if not doc.id or len(doc.id.encode()) > MAX_DOC_ID_BYTES:
                raise _invalid(f"document #{report['documents'] + 1} needs an id of 1 to {MAX_DOC_ID_BYTES} bytes")
            self._tokens(doc.text, f"document {doc.id!r}", minimum=1)
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"deadline passed after {report['documents']} document(s); "
                                       "those are stored, and sending them again adds nothing")
            try:
                with self.batcher.lock:  # the encoder and the store, shared with the scoring worker
                    r = ingest(self.encoder, domain.store, [Document(doc.id, doc.text)],
                               domain=domain.ingest_domain, show_progress=False, replace=replace)
            except KnnlmError:
                raise  # typed: its own code
            except Exception as exc:  # the backend's own exception types: the store failed, not the request
                raise DatastoreUnavailable([domain.name], exc) from exc
            report["documents"] += 1
            for key in ("tokens", "added", "skipped", "changed", "replaced"):
                report[key] += getattr(r, key)
        if domain is None:
            raise _invalid("Append got no documents")
        try:
            count = domain.store.count()
        except Exception as exc:
            raise DatastoreUnavailable([domain.name], exc) from exc
        log.info("appended %d document(s) to %s: %d entries added, %d already present, %d changed document(s) "
                 "kept, %d replaced", report["documents"], domain.name, report["added"], report["skipped"],
                 len(report["changed"]), len(report["replaced"]))
        return pb.AppendResponse(count=count, **report)

    @_rpc
    def ListDomains(self, request, context) -> pb.ListDomainsResponse:
        out = []
        for d in self.domains.values():
            try:
                count = d.store.count()
            except Exception as exc:
                raise DatastoreUnavailable([d.name], exc) from exc
            cal = d.calibration
            settings = pb.KnnSettings(k=cal.k, temperature=cal.temperature, adaptive=True) if cal is not None else \
                pb.KnnSettings(k=d.k, temperature=d.temperature, lmbda=d.lmbda, adaptive=False)
            out.append(pb.DomainInfo(name=d.name, backend=d.backend, count=count, model=d.store.info.model,
                                     key_type=d.store.info.key_type, settings=settings))
        return pb.ListDomainsResponse(domains=out)

    def close(self, timeout: float | None = None) -> None:
        """Stop the batcher (waiting at most ``timeout`` for a running batch), then close the stores."""
        self.batcher.close(timeout)
        self.metrics.close()
        for d in self.domains.values():
            try:
                d.store.close()
            except Exception as exc:  # closing must not hide the shutdown; say what was lost
                log.warning("closing domain %s: %s", d.name, exc)


@dataclass
class Listen:
    """Where and how the server listens. ``credentials``: ``grpc.ssl_server_credentials`` or None."""

    host: str = "[::]"
    port: int = 50051
    credentials: object = None
    health_port: int | None = None  # a separate plaintext port that answers only health (kubelet probes)
    interceptors: list = field(default_factory=list)


class KnnlmServer:
    """A started gRPC server around a ``KnnlmService``; ``stop`` drains in-flight requests."""

    def __init__(self, service: KnnlmService, listen: Listen, max_workers: int = 8):
        self.service = service
        limits = service.limits
        options = [("grpc.max_receive_message_length", limits.max_request_bytes),
                   ("grpc.max_send_message_length", limits.max_response_bytes),
                   ("grpc.so_reuseport", 0)]
        # Threads beyond max_workers keep health checks answered while every worker waits on a batch.
        self._pool = futures.ThreadPoolExecutor(max_workers=max_workers + 2, thread_name_prefix="knnlm-rpc")
        self.server = grpc.server(self._pool, options=options, interceptors=listen.interceptors,
                                  maximum_concurrent_rpcs=4 * (max_workers + 2))
        self.health = health.HealthServicer()
        add_servicer(service, self.server)  # malformed bytes -> INVALID_ARGUMENT, not INTERNAL + traceback
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{listen.host}:{listen.port}"
        if listen.credentials is not None:
            self.port = self.server.add_secure_port(address, listen.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.health_server = None
        self.health_port = None
        if listen.health_port is not None and (listen.health_port == 0 or listen.health_port != listen.port):
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                                             options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{listen.host}:{listen.health_port}")
        self._stopped = threading.Event()

    def start(self) -> "KnnlmServer":
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``grace`` seconds, then release everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while the server drains
        log.info("draining in-flight requests (up to %.0fs)", grace)
        deadline = time.monotonic() + grace
        self.server.stop(grace).wait(grace + 1.0)
        self.service.close(timeout=max(0.1, deadline - time.monotonic()))  # the grace bounds the whole stop
        if self.health_server is not None:
            self.health_server.stop(None).wait()
        self._pool.shutdown(wait=False)
        log.info("server stopped")

    def wait(self) -> None:
        self._stopped.wait()
