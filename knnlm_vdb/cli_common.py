"""What the CLI commands share: option sets, where datastores live, settings resolution, output.

Kept apart from cli.py so that commands living beside their concept (service/commands.py,
admin.py) can use it without importing the command group that registers them.
"""
from __future__ import annotations

import json
import os

import click

from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.settings import (DEFAULT_INDEX_BY_DEPLOYMENT, DEFAULT_K_BY_DEPLOYMENT, DEFAULTS, KEY_TYPES,
                               default_k, env_name)

TOKEN_ENV = "KNNLM_MILVUS_TOKEN"  # secrets come from the environment, never from argv


def opt(name: str, *decls, **kw):
    """A click option whose default and env var come from settings.DEFAULTS."""
    flag = "--" + name.replace("_", "-")
    kw.setdefault("default", DEFAULTS.get(name))
    kw.setdefault("show_default", True)
    return click.option(flag, *decls, envvar=env_name(name), **kw)


def model_options(f):
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


def location_options(multiple: bool):
    def deco(f):
        for o in reversed([
            click.option("--datastore", "datastores", multiple=multiple, type=click.Path(),
                         help="FAISS datastore directory" + (" (repeatable)" if multiple else "")),
            click.option("--backend", type=click.Choice(["faiss", "milvus"]), default=None,
                         help="faiss when --datastore is given, else milvus"),
            opt("uri", help="Milvus: local file (Milvus Lite) or http://host:19530; token from $" + TOKEN_ENV),
            click.option("--domain", "domains", multiple=multiple, default=None,
                         help="Milvus domain (collection)" + (" (repeatable: merged top-k)" if multiple else "")),
            opt("consistency", type=click.Choice(["Strong", "Bounded", "Session", "Eventually"]),
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
    return backend, domains or ["default"]


def new_domain_index(index: str, backend: str, uri: str) -> str:
    """``--index`` as given; when it was not given, a new Milvus Lite domain gets HNSW (see
    settings.DEFAULT_INDEX_BY_DEPLOYMENT) rather than the FLAT that Lite brute-forces."""
    ctx = click.get_current_context(silent=True)
    if backend != "milvus" or ctx is None or ctx.get_parameter_source("index") != click.core.ParameterSource.DEFAULT:
        return index
    from knnlm_vdb.datastore.milvus_store import deployment_of

    return DEFAULT_INDEX_BY_DEPLOYMENT.get(deployment_of(uri), index)


def milvus_options(consistency: str | None = None) -> dict:
    o = {"token": os.environ.get(TOKEN_ENV) or None}
    if consistency:
        o["consistency"] = consistency
    return o


def open_stores(backend, locations, uri, consistency, encoder=None):
    from knnlm_vdb.datastore import StoreInfo, open_store

    stores = []
    for loc in locations:
        if backend == "faiss":
            store = open_store("faiss", loc)
        else:
            store = open_store("milvus", uri, domain=loc, **milvus_options(consistency))
        if encoder is not None:
            store.info.check_compatible(StoreInfo.for_encoder(encoder), loc)
        stores.append(store)
    return stores


def make_encoder(model, key_type, ctx, stride, batch_size, device, dtype):
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.lm import load_lm

    return Encoder(load_lm(model, device=device, dtype=dtype), key_type=key_type, ctx=ctx, stride=stride,
                   batch_size=batch_size)


def parse_lambda(value):
    """``--lambda`` is a number in [0, 1] or ``auto`` (per-token λ from the stored calibration)."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise KnnlmError(f"--lambda must be a number in [0, 1] or 'auto', got {value!r}") from None


def resolve_knn_settings(stores, k, temperature, lmbda, skip_below=None):
    """-> (k, T, λ, calibrations). Flag or env var, else what `tune` stored with the datastores —
    adaptive λ when every datastore has a calibration (one per domain), else the first one's best
    fixed setting — else the default (k by backend: smaller on Milvus Lite, which searches brute
    force). ``skip_below`` overrides the calibrations' search threshold."""
    from knnlm_vdb.adaptive import Calibration
    from knnlm_vdb.knn import check_params

    extra = stores[0].info.extra if stores else {}
    lmbda = parse_lambda(lmbda)
    calibrated = [("calibration" in s.info.extra) for s in stores]
    if lmbda == "auto" or (lmbda is None and k is None and temperature is None and calibrated and all(calibrated)):
        if not all(calibrated):
            bare = stores[calibrated.index(False)] if stores else None
            label = getattr(bare, "domain", None) or getattr(bare, "path", None) or "the datastore"
            raise KnnlmError(f"--lambda auto needs a calibration for every datastore, and {label} has none: "
                             "run `knnlm-vdb tune` on validation text first")
        cals = [Calibration.from_dict(s.info.extra["calibration"]) for s in stores]
        if skip_below is not None:
            if not 0.0 <= skip_below < 1.0:
                raise KnnlmError(f"--skip-below must be in [0, 1), got {skip_below}")
            for c in cals:
                c.skip_below = skip_below
        return cals[0].k, cals[0].temperature, "auto", cals
    if skip_below is not None:
        raise KnnlmError("--skip-below applies to adaptive λ: use it with --lambda auto (after `knnlm-vdb tune`)")
    tuned = extra.get("tuned", {})
    k = k if k is not None else int(tuned.get("k", default_k(getattr(stores[0], "deployment", None)
                                                           if stores else None)))
    temperature = temperature if temperature is not None else float(tuned.get("temperature", DEFAULTS["temperature"]))
    lmbda = lmbda if lmbda is not None else float(tuned.get("lambda", DEFAULTS["lambda"]))
    check_params(lmbda=lmbda, k=k, temperature=temperature)
    return k, temperature, lmbda, None


def knn_options(f):
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


def emit(payload: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=float))
    else:
        for line in lines:
            click.echo(line)


def index_summary(index: dict) -> str:
    """``{'type': 'ivfpq', 'nlist': 64, ...}`` -> ``ivfpq nlist=64 ...`` (set fields only)."""
    index = dict(index)
    name = index.pop("type", None) or index.pop("index_type", "?")
    return " ".join([str(name)] + [f"{k}={v}" for k, v in sorted(index.items()) if v not in (None, {}, False)
                                   and k != "indexed_count"])
