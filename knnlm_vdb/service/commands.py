"""The ``serve`` and ``score`` commands (registered on the ``knnlm-vdb`` group in cli.py)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from knnlm_vdb.cli_common import (TOKEN_ENV, emit, knn_options, location_options, make_encoder, milvus_options,
                           model_options, open_stores, parse_lambda, resolve_knn_settings, resolve_locations)
from knnlm_vdb.errors import BackendUnavailable, Incompatible, InvalidInput, KnnlmError, NotFound
from knnlm_vdb.settings import REQUEST_TIMEOUT_ENV, REQUEST_TIMEOUT_S
from knnlm_vdb.service import security
from knnlm_vdb.service.limits import DEFAULT_MAX_WORKERS, Limits
from knnlm_vdb.settings import MAX_K

log = logging.getLogger("knnlm_vdb.serve")

MILVUS_TOKEN_FILE_ENV = "KNNLM_MILVUS_TOKEN_FILE"
TLS_DIR_ENV = "KNNLM_TLS_DIR"  # the Helm chart mounts the serve.tls.secretName Secret here (tls.crt, tls.key)
AUTH_DIR_ENV = "KNNLM_AUTH_DIR"  # and the serve.auth.tokenSecret Secret here (token, write-token)


def _from_dir(env: str, name: str) -> str | None:
    """``$env/name`` when the Helm chart mounted a Secret there and it holds that key."""
    d = os.environ.get(env)
    return str(Path(d) / name) if d and (Path(d) / name).is_file() else None


def _every_domain(uri, milvus_token) -> list[str]:
    """serve without --domain: every domain of the database at ``uri``."""
    from knnlm_vdb.datastore.milvus import list_domains, redact_uri

    found = list_domains(uri, token=milvus_token or milvus_options()["token"])
    if not found:
        raise NotFound(f"no domains at {redact_uri(uri)} to serve: create one with `knnlm-vdb build --domain D`")
    log.info("no --domain given: serving every domain at %s: %s", redact_uri(uri), ", ".join(found))
    return found


def _security(tls_cert, tls_key, tls_client_ca, token_file, write_token_file, insecure,
              allow_read_token_writes=False):
    """-> (server credentials or None, interceptors); refuses an open server unless --insecure."""
    tls_cert = tls_cert or _from_dir(TLS_DIR_ENV, "tls.crt")
    tls_key = tls_key or _from_dir(TLS_DIR_ENV, "tls.key")
    token_file = token_file or _from_dir(AUTH_DIR_ENV, "token")
    write_token_file = write_token_file or _from_dir(AUTH_DIR_ENV, "write-token")
    creds = None
    if tls_cert or tls_key or tls_client_ca:
        creds = security.server_credentials(tls_cert, tls_key, tls_client_ca)
    read = security.read_tokens(token_file, security.READ_TOKEN_ENV)
    write = security.read_tokens(write_token_file, security.WRITE_TOKEN_ENV)
    interceptors = [security.TokenAuth(read, write, allow_read_token_writes)] if (read or write) else []
    if creds is None and not interceptors:
        if not insecure:
            raise KnnlmError("refusing to serve without TLS or token authentication: pass --tls-cert/--tls-key, "
                             f"set ${security.READ_TOKEN_ENV} (or --token-file), or pass --insecure on a trusted network")
        log.warning("serving plaintext WITHOUT authentication (--insecure): anyone who reaches the gRPC port "
                    "can score and append")
    elif creds is None:  # like gRPC's own call credentials, which refuse to send tokens without TLS
        if not insecure:
            raise InvalidInput("refusing to accept bearer tokens over plaintext: pass --tls-cert/--tls-key, or "
                               "--insecure on a trusted network")
        log.warning("tokens are checked but travel in plaintext (--insecure); use --tls-cert/--tls-key outside "
                    "a trusted network")
    log.info("security: TLS %s, tokens: %d read, %d write", "mutual" if tls_client_ca else "on" if creds else "off",
             len(read), len(write))
    return creds, interceptors


@click.command()
@model_options
@location_options(multiple=True)
@knn_options
@click.option("--host", default="[::]", show_default=True, envvar="KNNLM_HOST", help="address to listen on")
@click.option("--port", type=int, default=50051, show_default=True, envvar="KNNLM_PORT", help="gRPC port (0: any free)")
@click.option("--health-port", type=int, default=None, envvar="KNNLM_HEALTH_PORT",
              help="also answer grpc.health.v1 on this plaintext port (kubelet probes when TLS is on)")
@click.option("--max-workers", type=int, default=DEFAULT_MAX_WORKERS, show_default=True, envvar="KNNLM_MAX_WORKERS",
              help="gRPC request threads")
@click.option("--max-batch", type=int, default=32, show_default=True, help="requests per LM forward (1: no batching)")
@click.option("--batch-wait-ms", type=float, default=5.0, show_default=True,
              help="how long a batch waits for more requests")
@click.option("--max-text-tokens", type=int, default=Limits.max_text_tokens, show_default=True,
              help="tokens per Score text, NextToken context or appended document")
@click.option("--max-k", type=int, default=Limits.max_k, show_default=True, help="largest k a request may ask for")
@click.option("--max-new-tokens", type=int, default=Limits.max_new_tokens, show_default=True,
              help="largest max_new_tokens a Generate request may ask for")
@click.option("--max-request-bytes", type=int, default=Limits.max_request_bytes, show_default=True, help="largest gRPC message")
@click.option("--max-concurrent", type=int, default=None,
              help="requests in progress at once; more get RESOURCE_EXHAUSTED [default: --max-workers]")
@click.option("--request-timeout", type=float, default=Limits.request_timeout_s, show_default=True, envvar=REQUEST_TIMEOUT_ENV,
              help="seconds per request when the client sets no deadline, and the cap on longer ones "
                   "(score --timeout reads the same variable)")
@click.option("--metrics-port", type=int, default=None, envvar="KNNLM_METRICS_PORT",
              help="serve Prometheus metrics over HTTP on this port (0: any free) [default: off]")
@click.option("--grace", type=float, default=20.0, show_default=True,
              help="seconds in-flight requests get to finish on SIGTERM")
@click.option("--tls-cert", type=click.Path(dir_okay=False), envvar="KNNLM_TLS_CERT",
              help=f"server certificate (PEM) [default: ${TLS_DIR_ENV}/tls.crt]")
@click.option("--tls-key", type=click.Path(dir_okay=False), envvar="KNNLM_TLS_KEY",
              help=f"server private key (PEM) [default: ${TLS_DIR_ENV}/tls.key]")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), envvar="KNNLM_TLS_CLIENT_CA",
              help="require client certificates signed by this CA (mutual TLS)")
@click.option("--token-file", type=click.Path(dir_okay=False), envvar="KNNLM_SERVE_TOKEN_FILE",
              help=f"accepted client tokens, one per line [default: ${security.READ_TOKEN_ENV}, "
                   f"or ${AUTH_DIR_ENV}/token]")
@click.option("--write-token-file", type=click.Path(dir_okay=False), envvar="KNNLM_SERVE_WRITE_TOKEN_FILE",
              help=f"tokens Append requires [default: ${security.WRITE_TOKEN_ENV}, or ${AUTH_DIR_ENV}/write-token]")
@click.option("--insecure", is_flag=True, envvar="KNNLM_SERVE_INSECURE",
              help="allow plaintext without authentication (trusted networks only)")
@click.option("--allow-read-token-writes", is_flag=True, envvar="KNNLM_SERVE_ALLOW_READ_TOKEN_WRITES",
              help="let read tokens Append too (by default Append needs a write token whenever tokens are set)")
@click.option("--milvus-token-file", type=click.Path(dir_okay=False), envvar=MILVUS_TOKEN_FILE_ENV,
              help=f"Milvus token from a file [default: ${TOKEN_ENV}]")
@click.option("--mirror", is_flag=True, envvar="KNNLM_MIRROR",
              help="Milvus Lite: search an in-process copy of each domain (one full read at start, then "
                   "milliseconds per search instead of Lite's ~1.3 µs per row; appends refresh it)")
def serve(model, key_type, ctx, stride, batch_size, device, dtype, datastores, backend, uri, domains, consistency,
          k, temperature, lmbda, skip_below, cache, host, port, health_port, max_workers, max_batch, batch_wait_ms, max_text_tokens,
          max_new_tokens, max_k, max_request_bytes, max_concurrent, request_timeout, metrics_port, grace, tls_cert,
          tls_key, tls_client_ca, token_file, write_token_file, insecure, allow_read_token_writes, milvus_token_file,
          mirror):
    """Serve Score, NextToken, Generate, Append and ListDomains over gRPC (package knnlm.v1).

    Serves each --domain (Milvus) or --datastore (FAISS); with neither, every domain of the
    Milvus database at --uri. The model and datastores load once; concurrent requests are
    batched into one LM forward and one search. SIGTERM stops accepting requests and drains
    the ones in flight.
    """
    import numpy as np

    from knnlm_vdb.knn import check_params
    from knnlm_vdb.service.metrics import Metrics
    from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Listen

    for name, value, low in (("--max-workers", max_workers, 1), ("--max-batch", max_batch, 1),
                             ("--max-text-tokens", max_text_tokens, 2), ("--max-k", max_k, 1),
                             ("--max-new-tokens", max_new_tokens, 1),
                             ("--max-request-bytes", max_request_bytes, 1024), ("--max-concurrent", max_concurrent, 1)):
        if value is not None and value < low:
            raise KnnlmError(f"{name} must be at least {low}, got {value}")
    if max_k > MAX_K:
        raise InvalidInput(f"--max-k must be at most {MAX_K} (the most neighbours any backend returns), got {max_k}")
    if batch_wait_ms < 0 or request_timeout <= 0 or grace < 0:
        raise KnnlmError("--batch-wait-ms and --grace must be >= 0 and --request-timeout > 0")
    lam = parse_lambda(lmbda)
    check_params(lmbda=None if lam == "auto" else lam, k=k, temperature=temperature)
    if k is not None and k > max_k:
        raise KnnlmError(f"--k {k} exceeds --max-k {max_k}")
    creds, interceptors = _security(tls_cert, tls_key, tls_client_ca, token_file, write_token_file, insecure,
                                    allow_read_token_writes)
    milvus_token = security.read_secret(milvus_token_file) if milvus_token_file else None
    if not domains and not datastores and backend in (None, "milvus"):
        domains = _every_domain(uri, milvus_token)
    backend, locations = resolve_locations(datastores, backend, uri, domains)

    from knnlm_vdb import knn_settings

    encoder = make_encoder(model, key_type, ctx, stride, batch_size, device, dtype)
    stores = open_stores(backend, locations, uri, consistency, encoder, token=milvus_token, mirror=mirror)
    served = []
    for loc, store in zip(locations, stores):
        name = Path(loc).name if backend == "faiss" else loc
        if any(d.name == name for d in served):
            raise KnnlmError(f"two datastores would both be served as domain {name!r}; rename one directory")
        calibrated = "calibration" in store.info.extra  # uncalibrated domains: fixed λ, no cache
        dk, dt, dl, calibrations = resolve_knn_settings(
            [store], k, temperature, lmbda, skip_below if calibrated else None, cache if calibrated else None)
        calibration = calibrations[0] if calibrations else None
        cache_cal = knn_settings.cache_calibration([store], cache) if calibration is not None else None
        if calibration is not None:  # requests that set k, T or λ get the tuned fixed setting
            dk, dt, dl, _ = resolve_knn_settings([store], dk, dt, None)
        if dk > max_k:
            raise KnnlmError(f"domain {name}: its k={dk} exceeds --max-k {max_k}")
        ingest_domain = store.domain
        store.search(np.zeros((1, store.info.dim), np.float32), 1)  # load the index now
        served.append(Domain(name, store, backend, ingest_domain, dk, dt, dl, calibration, cache_cal))
        click.echo(f"domain {name} ({store.count():,} entries): "
                   + (f"adaptive λ (k={calibration.k}, T={calibration.temperature}, "
                      f"skip_below={calibration.skip_below:g}{', in-document cache' if cache_cal else ''})"
                      if calibration is not None else f"k={dk} T={dt} λ={dl}"))
    limits = Limits(max_text_tokens=max_text_tokens, max_k=max_k, max_request_bytes=max_request_bytes,
                    max_concurrent=max_concurrent or max_workers, request_timeout_s=request_timeout,
                    max_new_tokens=max_new_tokens)
    service = KnnlmService(encoder, served, limits, max_batch=max_batch, max_wait_s=batch_wait_ms / 1e3,
                           metrics=Metrics())
    try:
        server = KnnlmServer(service, Listen(host, port, creds, health_port, interceptors), max_workers=max_workers)
    except OSError as exc:
        service.close()
        raise KnnlmError(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if metrics_port is not None:
        try:
            click.echo(f"metrics on http://{host}:{service.metrics.serve_http(metrics_port, host)}/metrics")
        except OSError as exc:
            server.stop(0)
            raise KnnlmError(f"cannot serve metrics on port {metrics_port}: {exc}") from None
    click.echo(f"listening on {host}:{server.port} ({'TLS' if creds else 'plaintext'}) "
               f"domains: {', '.join(d.name for d in served)}"
               + (f"; health on :{server.health_port}" if server.health_port else ""))
    while not stop.wait(0.5):
        pass
    click.echo(f"stopping: draining in-flight requests (up to {grace:g}s)")
    deadline = time.monotonic() + grace + 1.0
    server.stop(grace)
    click.echo("stopped")
    _exit_despite_stuck_requests(deadline)


def _exit_despite_stuck_requests(deadline: float) -> None:
    """Leave now that the stores are closed. Request threads still busy past the grace (an
    Append inside one long document) or an abandoned batch would keep a normal interpreter exit
    waiting on them (and its teardown of torch and grpc takes seconds more), past the
    Kubernetes grace period; so exit at once."""
    busy = [t for t in threading.enumerate() if t.name.startswith("knnlm-rpc") and t.is_alive()]
    for t in busy:
        t.join(max(0.0, min(0.2, deadline - time.monotonic())))
    if any(t.is_alive() for t in busy):
        log.warning("request threads still busy after the grace period; exiting without them")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _client_options(f):
    for o in reversed([
        click.option("--server", "target", required=True, envvar="KNNLM_SERVER", help="host:port of knnlm-vdb serve"),
        click.option("--tls", is_flag=True, help="use TLS with the system's root certificates"),
        click.option("--tls-ca", type=click.Path(dir_okay=False), help="CA certificate (PEM) that signed the server's"),
        click.option("--tls-cert", type=click.Path(dir_okay=False), help="client certificate (PEM), for mutual TLS"),
        click.option("--tls-key", type=click.Path(dir_okay=False), help="client private key (PEM), for mutual TLS"),
        click.option("--server-name", default=None, help="name to check the server's certificate against"),
        click.option("--token-file", type=click.Path(dir_okay=False), envvar="KNNLM_SERVE_TOKEN_FILE",
                     help=f"bearer token file [default: ${security.READ_TOKEN_ENV}]"),
    ]):
        f = o(f)
    return f


# a failed call's status -> the error (and so the exit code) score reports: retryable ones exit 3
_RPC_ERRORS = {"UNAVAILABLE": BackendUnavailable, "DEADLINE_EXCEEDED": BackendUnavailable,
               "RESOURCE_EXHAUSTED": BackendUnavailable, "INVALID_ARGUMENT": InvalidInput, "NOT_FOUND": NotFound,
               "FAILED_PRECONDITION": Incompatible}


def make_client(target, tls, tls_ca, tls_cert, tls_key, server_name, token_file):
    from knnlm_vdb.service.client import KnnlmClient

    if (tls_cert is None) != (tls_key is None):
        raise KnnlmError("a client certificate needs both --tls-cert and --tls-key")
    for what, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None:
            security.read_file(path, what)
    token = security.read_secret(token_file, security.READ_TOKEN_ENV)
    return KnnlmClient(target, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, server_name=server_name,
                       token=token)


@click.command()
@_client_options
@click.option("--domain", "domains", multiple=True, help="domain to search (repeatable) [default: all served]")
@click.option("--k", type=int, default=None, help="neighbours per query [default: the server's]")
@click.option("--temperature", "-T", type=float, default=None, help="softmax temperature [default: the server's]")
@click.option("--lambda", "lmbda", default=None,
              help="kNN weight in [0, 1], or 'auto' for the domain's adaptive λ [default: the server's]")
@click.option("--timeout", type=float, default=REQUEST_TIMEOUT_S, show_default=True, envvar=REQUEST_TIMEOUT_ENV,
              help="seconds per document; the server caps it at its --request-timeout (the same variable)")
@click.option("--json", "as_json", is_flag=True, help="print results as JSON")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def score(target, tls, tls_ca, tls_cert, tls_key, server_name, token_file, domains, k, temperature, lmbda, timeout,
          as_json, files):
    """Perplexity of FILES (text or JSONL) under a running server's base LM and kNN-LM."""
    import grpc
    import numpy as np

    from knnlm_vdb.corpus import read_corpora
    from knnlm_vdb.knn import check_params, perplexity

    lam = parse_lambda(lmbda)
    check_params(lmbda=None if lam == "auto" else lam, k=k, temperature=temperature)
    settings = {"k": k, "temperature": temperature, "lmbda": None if lam == "auto" else lam,
                "adaptive": True if lam == "auto" else None}
    docs = read_corpora(files)
    base, mixed, lambdas, searched, used, used_domains = [], [], [], 0.0, None, []
    t0 = time.perf_counter()
    with make_client(target, tls, tls_ca, tls_cert, tls_key, server_name, token_file) as client:
        for doc in docs:
            try:
                r = client.score(doc.text, domains=domains, timeout=timeout, **settings)
            except grpc.RpcError as exc:
                cls = _RPC_ERRORS.get(exc.code().name, KnnlmError)
                raise cls(f"{target}: {exc.code().name}: {exc.details()} (document {doc.doc_id})") from None
            base.append(np.asarray(r.base_logprobs, np.float64))
            mixed.append(np.asarray(r.logprobs, np.float64))
            lambdas.append(np.asarray(r.lambdas, np.float64) if r.settings.adaptive else
                           np.full(r.scored_tokens, r.settings.lmbda))
            searched += r.searched_fraction * r.scored_tokens
            used, used_domains = r.settings, list(r.domains)
    seconds = time.perf_counter() - t0
    base, mixed, lambdas = np.concatenate(base), np.concatenate(mixed), np.concatenate(lambdas)
    n = len(base)
    result = {"tokens": n, "base_ppl": perplexity(base), "knnlm_ppl": perplexity(mixed),
              "documents": len(docs), "k": used.k, "temperature": used.temperature,
              "lambda": "auto" if used.adaptive else used.lmbda, "mean_lambda": float(lambdas.mean()),
              "searched_fraction": searched / n, "domains": used_domains, "server": target, "seconds": seconds,
              "knnlm_tokens_per_s": n / seconds if seconds else None}
    emit(result, as_json, [
        f"tokens          {n:,} in {len(docs)} document(s)",
        f"base LM         perplexity {result['base_ppl']:.3f}",
        f"kNN-LM          perplexity {result['knnlm_ppl']:.3f} (k={used.k}, T={used.temperature:g}, "
        f"λ={'auto, mean ' if used.adaptive else ''}{result['mean_lambda']:.3g}; domains {', '.join(used_domains)}; "
        f"{100 * result['searched_fraction']:.0f}% of tokens searched) via {target} in {seconds:.1f}s",
    ])

