"""What the CLI commands share: option sets, where datastores live, settings resolution, output.

Kept apart from cli.py so that commands living beside their concept (service/commands.py,
admin.py) can use it without importing the command group that registers them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re

import click

from knnlm_vdb.errors import InvalidInput, KnnlmError
from knnlm_vdb.knn_settings import parse_lambda  # noqa: F401  (re-exported for the commands)
from knnlm_vdb.datastore.spec import BACKENDS
from knnlm_vdb.settings import (CONSISTENCY_LEVELS, DEFAULT_INDEX_BY_DEPLOYMENT, DEFAULT_K_BY_DEPLOYMENT, DEFAULTS,
                                KEY_TYPES, env_name)

TOKEN_ENV = "KNNLM_MILVUS_TOKEN"  # secrets come from the environment, never from argv


def opt(name: str, *decls, **kw):
    """A click option whose default and env var come from settings.DEFAULTS."""
    flag = "--" + name.replace("_", "-")
    kw.setdefault("default", DEFAULTS.get(name))
    kw.setdefault("show_default", True)
    return click.option(flag, *decls, envvar=env_name(name), **kw)


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def checked_before(check):
    """Decorator: run ``check(kwargs)`` on the command's options before its body, so a bad option
    fails in well under a second, before any model load or write."""
    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            check(kwargs)
            return f(*args, **kwargs)
        return wrapper
    return deco


def check_model_options(o: dict) -> None:
    from knnlm_vdb.encoder import sliding_windows

    sliding_windows(o["ctx"], o["ctx"], o["stride"])  # --ctx >= 2, 1 <= --stride <= --ctx
    if o["batch_size"] < 1:
        raise InvalidInput(f"--batch-size must be positive, got {o['batch_size']}")
    if not _DEVICE_RE.fullmatch(o["device"] or ""):
        raise InvalidInput(f"--device must be auto, cpu, mps, cuda or cuda:N, got {o['device']!r}")


def model_options(f):
    f = checked_before(check_model_options)(f)
    for o in reversed([
        opt("model", help="hub id, local directory, .gguf file, or smollm2-135m (bundled)"),
        opt("key_type", type=click.Choice(KEY_TYPES), help="which hidden state is the key"),
        opt("ctx", type=int, help="window length in tokens"),
        opt("stride", type=int, help="new targets per window; each has >= ctx-stride tokens of context"),
        opt("batch_size", type=int, help="windows per forward pass"),
        opt("device", help="auto, cpu or cuda[:N]"),
        opt("dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"])),
    ]):
        f = o(f)
    return f


def check_location_options(o: dict) -> None:
    """Names and URI are well formed; a FAISS datastore exists and passes its integrity checks
    (opening one reads only meta.json, the ledger and file sizes)."""
    backend, locations = resolve_locations(o["datastores"], o["backend"], o["uri"], o["domains"])
    if backend == "faiss":
        from knnlm_vdb.datastore.faiss_store import FaissDatastore

        for loc in locations:
            FaissDatastore(loc)


def location_options(multiple: bool):
    def deco(f):
        f = checked_before(check_location_options)(f)
        for o in reversed([
            click.option("--datastore", "datastores", multiple=multiple, type=click.Path(),
                         help="FAISS datastore directory" + (" (repeatable)" if multiple else "")),
            click.option("--backend", type=click.Choice(BACKENDS), default=None,
                         help="faiss when --datastore is given, else milvus"),
            opt("uri", help="Milvus: local file (Milvus Lite) or http://host:19530; token from $" + TOKEN_ENV),
            click.option("--domain", "domains", multiple=multiple, default=None,
                         help="Milvus domain (collection)" + (" (repeatable: merged top-k)" if multiple else "")),
            opt("consistency", type=click.Choice(CONSISTENCY_LEVELS),
                help="Milvus read consistency"),
        ]):
            f = o(f)
        return f
    return deco


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def resolve_locations(datastores, backend, uri, domains) -> tuple[str, list[str]]:
    """-> (backend, [locations]); for Milvus the locations are domain names at ``uri``."""
    datastores, domains = _as_list(datastores), _as_list(domains)
    if backend is None:
        backend = "faiss" if datastores else "milvus"
    if backend == "faiss":
        if domains:
            raise KnnlmError("--domain is for the Milvus backend; a FAISS datastore is a directory (--datastore DIR)")
        if not datastores:
            raise KnnlmError("--backend faiss needs --datastore DIR")
        return backend, datastores
    if datastores:
        raise KnnlmError("--datastore is a FAISS directory; for Milvus use --uri and --domain")
    from knnlm_vdb.datastore.milvus import check_domain, deployment_of

    deployment_of(uri)  # the URI scheme, before anything loads or connects
    for d in domains:
        check_domain(d)
    return backend, domains or ["default"]


def new_domain_index(index: str, backend: str, uri: str) -> str:
    """``--index`` as given; when it was not given, a new Milvus Lite domain gets HNSW (see
    settings.DEFAULT_INDEX_BY_DEPLOYMENT) rather than the FLAT that Lite brute-forces."""
    ctx = click.get_current_context(silent=True)
    if backend != "milvus" or ctx is None or ctx.get_parameter_source("index") != click.core.ParameterSource.DEFAULT:
        return index
    from knnlm_vdb.datastore.milvus import deployment_of

    return DEFAULT_INDEX_BY_DEPLOYMENT.get(deployment_of(uri), index)


def milvus_options(consistency: str | None = None) -> dict:
    o = {"token": os.environ.get(TOKEN_ENV) or None}
    if consistency:
        o["consistency"] = consistency
    return o


def store_spec(backend: str, location: str, uri: str | None, consistency: str | None = None,
               token: str | None = None, mirror: bool = False):
    """One ``resolve_locations`` location -> a ``datastore.StoreSpec`` (the Milvus ``token``, else $KNNLM_MILVUS_TOKEN)."""
    from knnlm_vdb.datastore import StoreSpec

    if backend == "faiss":
        return StoreSpec("faiss", location)
    o = milvus_options(consistency)
    return StoreSpec("milvus", uri, domain=location, consistency=o.get("consistency"), token=token or o["token"],
                     mirror=mirror)


def open_stores(backend, locations, uri, consistency, encoder=None, token=None, mirror=False):
    """Open each location's store and refuse another model's (``Incompatible``); ``mirror``: Lite
    domains read through an in-process copy."""
    from knnlm_vdb.datastore import StoreInfo, open_spec

    stores = []
    for loc in locations:
        store = open_spec(store_spec(backend, loc, uri, consistency, token, mirror))
        if encoder is not None:
            store.info.check_compatible(StoreInfo.for_encoder(encoder), loc)
        stores.append(store)
    return stores


def make_encoder(model, key_type, ctx, stride, batch_size, device, dtype):
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.lm import load_lm

    return Encoder(load_lm(model, device=device, dtype=dtype), key_type=key_type, ctx=ctx, stride=stride,
                   batch_size=batch_size)


def resolve_knn_settings(stores, k, temperature, lmbda, skip_below=None, cache=None):
    """-> (k, T, λ, calibrations) by ``knn_settings.resolve`` (see there for the order); ``cache`` is
    checked against them (``knn_settings.cache_calibration`` gives its calibration)."""
    from knnlm_vdb.knn_settings import resolve

    s = resolve(stores, k, temperature, lmbda, skip_below, cache)
    return s.k, s.temperature, s.lmbda, (list(s.calibrations) if s.adaptive else None)


def check_knn_options(o: dict) -> None:
    from knnlm_vdb.knn import check_params

    lam = parse_lambda(o["lmbda"])
    check_params(lmbda=None if lam == "auto" else lam, k=o["k"], temperature=o["temperature"])


def knn_options(f):
    f = checked_before(check_knn_options)(f)
    for o in reversed([
        click.option("--k", type=int, default=None, envvar=env_name("k"),
                     help=f"neighbours per query [default: tuned, else {DEFAULTS['k']}; "
                          f"{DEFAULT_K_BY_DEPLOYMENT['lite']} on Milvus Lite]"),
        click.option("--temperature", "-T", type=float, default=None, envvar=env_name("temperature"),
                     help=f"softmax temperature over -distance [default: tuned, else {DEFAULTS['temperature']}]"),
        click.option("--lambda", "lmbda", default=None, envvar=env_name("lambda"),
                     help="kNN weight in [0, 1], or 'auto' for a per-token λ from the tuned calibration "
                          f"[default: tuned, else {DEFAULTS['lambda']}]"),
        click.option("--skip-below", type=float, default=None, envvar=env_name("skip_below"),
                     help="with --lambda auto: skip the search where the pre-search gate's λ is below this; "
                          "higher is faster and less accurate, 0 searches everywhere [default: tuned]"),
        click.option("--cache/--no-cache", default=None, envvar=env_name("cache"),
                     help="with --lambda auto: also mix in the in-document cache (the keys of the text's "
                          "earlier positions) [default: on where `tune` calibrated it]"),
    ]):
        f = o(f)
    return f


def read_token_sequences(encoder, corpus_files, max_tokens):
    from knnlm_vdb.corpus import read_corpora

    sequences, budget = [], max_tokens
    for doc in read_corpora(corpus_files):
        ids = encoder.tokenize(doc.text)
        if budget is not None:
            ids = ids[: budget + 1]
            budget -= max(0, len(ids) - 1)
        if len(ids) >= 2:
            sequences.append(ids)
        if budget is not None and budget <= 0:
            break
    if not sequences:
        raise KnnlmError("the corpus has fewer than 2 tokens: nothing to score")
    return sequences


def strict_json(obj):
    """``obj`` with every non-finite number (NaN, ±inf) as None and numpy scalars as Python ones,
    so the output is standard JSON (RFC 8259 has no NaN/Infinity) that any parser reads."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if getattr(obj, "ndim", None) is not None and hasattr(obj, "tolist"):  # numpy scalar or array
        return strict_json(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def emit(payload: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:  # non-finite numbers are printed as null: see strict_json
        click.echo(json.dumps(strict_json(payload), indent=2, default=float, allow_nan=False))
    else:
        for line in lines:
            click.echo(line)


def index_summary(index: dict) -> str:
    """``{'type': 'ivfpq', 'nlist': 64, ...}`` -> ``ivfpq nlist=64 ...`` (set fields only)."""
    index = dict(index)
    name = index.pop("type", None) or index.pop("index_type", "?")
    return " ".join([str(name)] + [f"{k}={v}" for k, v in sorted(index.items()) if v not in (None, {}, False)
                                   and k != "indexed_count"])
