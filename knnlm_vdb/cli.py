"""The ``knnlm-vdb`` command line.

Only this module prints. Errors a user can cause arrive as ``KnnlmError`` and leave as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.

Where the datastore lives:
  ``--datastore DIR``            a FAISS datastore directory;
  ``--uri U --domain D``         a Milvus collection per domain; U is a local file
                                 (Milvus Lite, the default ``./knnlm.db``) or ``http://host:19530``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from knnlm_vdb import __version__
from knnlm_vdb.cli_common import (emit, index_summary, knn_options, location_options, make_encoder, model_options,
                                  new_domain_index, open_stores, opt, parse_lambda, read_token_sequences,
                                  resolve_knn_settings, resolve_locations, store_spec)
from knnlm_vdb.datastore.spec import BACKENDS
from knnlm_vdb.errors import KnnlmError, classify
from knnlm_vdb.settings import CONSISTENCY_LEVELS

log = logging.getLogger("knnlm_vdb")

# what the `cpu`/`gpu` extras add to the client-only install
RUNTIME_MODULES = {"torch", "transformers", "gguf", "faiss", "pymilvus", "milvus_lite", "grpc_reflection", "tqdm",
                   "prometheus_client"}


def _show_envvars(cmd: click.Command) -> click.Command:
    """``--help`` names each option's environment variable (click's show_envvar), subcommands too."""
    for p in cmd.params:
        if isinstance(p, click.Option) and p.envvar:
            p.show_envvar = True
    for sub in getattr(cmd, "commands", {}).values():
        _show_envvars(sub)
    return cmd


class _Group(click.Group):
    def parse_args(self, ctx, args):
        """``-v``/``-vv``/``--verbose`` anywhere before ``--`` (also after the subcommand) is the group's."""
        args = list(args)
        end = args.index("--") if "--" in args else len(args)
        verbose = [a for a in args[:end] if a == "--verbose" or (len(a) > 1 and a.strip("v") == "-")]
        rest = [a for a in args[:end] if a not in verbose] + args[end:]
        return super().parse_args(ctx, verbose + rest)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        return _show_envvars(cmd) if cmd is not None else None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KnnlmError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(classify(exc)[0])
        except ModuleNotFoundError as exc:  # the client-only install (no extra) runs only `score`
            if (exc.name or "").split(".")[0] not in RUNTIME_MODULES:
                raise
            click.echo(f"error: this command needs the full install (module {exc.name!r} is missing): "
                       "pip install 'knnlm-vdb[cpu]' (or [gpu] for faiss-gpu)", err=True)
            sys.exit(2)



# ---------------------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", count=True, help="-v: progress logs, -vv: debug")
def main(verbose: int) -> None:
    """Nearest-neighbour language models backed by a vector database."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for noisy in ("faiss.loader", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _ingest_into(store, encoder, corpus, max_tokens, shard, replace, as_json):
    from knnlm_vdb.corpus import read_corpora
    from knnlm_vdb.ingest import ingest

    report = ingest(encoder, store, read_corpora(corpus), domain=store.domain, max_tokens=max_tokens,
                    show_progress=not as_json, shard=shard, replace=replace)
    store.finalize()
    desc = store.describe()
    store.close()
    lines = [
        f"{report.added:,} entries added, {report.skipped:,} already present "
        f"({report.tokens:,} tokens encoded from {report.documents} document(s), "
        f"{report.chunks_already_committed} chunk(s) already committed) in {report.seconds:.1f}s",
        f"datastore: {desc.get('path') or desc.get('uri')} ({desc['count']:,} entries)  index: {index_summary(desc['index'])}",
    ]
    if report.replaced:
        lines.append(f"replaced {len(report.replaced)} changed document(s): {', '.join(report.replaced)}")
    if report.changed:
        lines.append(f"warning: {len(report.changed)} document(s) changed since they were ingested and were "
                     f"skipped (use --replace): {', '.join(report.changed)}")
    emit({**report.to_dict(), "datastore": desc}, as_json, lines)


def _fit_projection(encoder, docs, dim: int, project_dim: int | None, max_tokens: int | None):
    """The key projection of a new store (None without --project-dim), fitted on keys spread over what it will hold."""
    if project_dim is None:
        return None
    from knnlm_vdb.ingest import sample_keys
    from knnlm_vdb.projection import SAMPLE_ROWS, Projection, check_project_dim

    check_project_dim(project_dim, dim)
    return Projection.fit(sample_keys(encoder, docs, SAMPLE_ROWS, max_tokens), project_dim)


def _check_max_tokens(max_tokens):
    if max_tokens is not None and max_tokens < 1:
        raise KnnlmError(f"--max-tokens must be positive, got {max_tokens}")


@main.command()
@model_options
@click.option("--corpus", multiple=True, required=True, type=click.Path(), help="text or JSONL file (repeatable)")
@click.option("--datastore", "--out", "datastores", type=click.Path(), default=None,
              help="FAISS datastore directory to create (--out is the same option)")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="faiss when --datastore is given, else milvus")
@opt("uri", help="Milvus: local file (Milvus Lite) or http://host:19530")
@click.option("--domain", "domains", default=None, help="Milvus domain (collection) to create")
@opt("consistency", type=click.Choice(CONSISTENCY_LEVELS), help="Milvus read consistency")
@click.option("--max-tokens", type=int, default=None,
              help="stop after adding this many datastore entries (one per scored corpus token)")
@opt("index", show_default=False, help="FAISS: flat|sq8|pq|ivfpq|rq; Milvus: FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ, HNSW, "
                                       "... (see README) [default: flat; HNSW on Milvus Lite]")
@click.option("--nlist", type=int, default=None, help="IVF lists [default: ~4·sqrt(n)]")
@click.option("--pq-m", type=int, default=None, help="code bytes per entry (FAISS pq/ivfpq/rq, Milvus IVF_PQ m) "
                                                     "[default: 64-byte codes]")
@opt("nprobe", type=int, help="IVF lists visited per query")
@click.option("--recompute/--no-recompute", default=False,
              help="FAISS sq8/pq/ivfpq/rq: re-score candidates with the stored keys")
@opt("key_dtype", type=click.Choice(["float16", "float32"]), help="FAISS key storage")
@click.option("--project-dim", type=int, default=None,
              help="store keys projected to this dimension by a PCA fitted on keys sampled over the corpus "
                   "[default: none]")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def build(model, key_type, ctx, stride, batch_size, device, dtype, corpus, datastores, backend, uri, domains,
          consistency, max_tokens, index, nlist, pq_m, nprobe, recompute, key_dtype, project_dim, as_json):
    """Build a new datastore from corpus files (an append into a new, empty datastore)."""
    from knnlm_vdb.corpus import read_corpora
    from knnlm_vdb.datastore import IndexSpec, StoreInfo, create_spec

    backend, (location,) = resolve_locations(datastores, backend, uri, domains)
    _check_max_tokens(max_tokens)
    spec = store_spec(backend, location, uri, consistency)
    index_spec = IndexSpec.from_options(backend, new_domain_index(index, backend, uri), nlist=nlist, pq_m=pq_m,
                                        nprobe=nprobe, recompute=recompute, key_dtype=key_dtype,
                                        project_dim=project_dim)
    docs = read_corpora(corpus)  # fail on bad input before loading the model
    encoder = make_encoder(model, key_type, ctx, stride, batch_size, device, dtype)
    info = StoreInfo.for_encoder(encoder)
    store = create_spec(spec, info, index_spec, projection=_fit_projection(encoder, docs, info.dim, project_dim,
                                                                                     max_tokens))
    _ingest_into(store, encoder, corpus, max_tokens, (0, 1), False, as_json)


@main.command()
@model_options
@click.option("--corpus", multiple=True, required=True, type=click.Path(), help="text or JSONL file (repeatable)")
@location_options(multiple=False)
@click.option("--shard", default="0/1", show_default=True, help="encode only shard i of N (i/N), for parallel workers")
@click.option("--replace", is_flag=True, help="re-ingest documents whose text changed, deleting their old entries")
@click.option("--max-tokens", type=int, default=None,
              help="stop after adding this many datastore entries (one per scored corpus token)")
@opt("index", show_default=False, help="Milvus: index of a domain that does not exist yet (FLAT, IVF_FLAT, "
                                       "HNSW, ...) [default: FLAT; HNSW on Milvus Lite]")
@click.option("--nlist", type=int, default=None, help="Milvus: IVF lists of a new domain")
@opt("nprobe", type=int, help="Milvus: IVF lists visited per query, for a new domain")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def append(model, key_type, ctx, stride, batch_size, device, dtype, corpus, datastores, backend, uri, domains,
           consistency, shard, replace, max_tokens, index, nlist, nprobe, as_json):
    """Add documents to a live datastore: idempotent, resumable after a crash, shardable.

    A Milvus domain that does not exist yet is created (with --index, like build); parallel
    shards may all try at once, and all but one then open the domain the winner made.
    """
    from knnlm_vdb.corpus import read_corpora
    from knnlm_vdb.datastore import IndexSpec, StoreInfo, open_or_create, preflight
    from knnlm_vdb.ingest import parse_shard

    backend, (location,) = resolve_locations(datastores, backend, uri, domains)  # a FAISS store exists (checked)
    shard_spec = parse_shard(shard)
    _check_max_tokens(max_tokens)
    read_corpora(corpus)
    spec = store_spec(backend, location, uri, consistency)
    preflight(spec)  # a database newer than this code: refuse before the model loads
    index_spec = IndexSpec.from_options(backend, new_domain_index(index, backend, uri), nlist=nlist, nprobe=nprobe)
    encoder = make_encoder(model, key_type, ctx, stride, batch_size, device, dtype)
    info = StoreInfo.for_encoder(encoder)
    store = open_or_create(spec, info, index_spec)
    store.info.check_compatible(info, location)
    _ingest_into(store, encoder, corpus, max_tokens, shard_spec, replace, as_json)


@main.command(name="eval")
@model_options
@location_options(multiple=True)
@knn_options
@click.option("--corpus", multiple=True, required=True, type=click.Path(), help="text or JSONL file to score")
@click.option("--max-tokens", type=int, default=None, help="score at most this many corpus tokens")
@click.option("--json", "as_json", is_flag=True, help="print results as JSON")
def eval_cmd(model, key_type, ctx, stride, batch_size, device, dtype, datastores, backend, uri, domains, consistency,
             k, temperature, lmbda, skip_below, cache, corpus, max_tokens, as_json):
    """Perplexity of the base LM and the kNN-LM over the same tokens."""
    from knnlm_vdb.api import KnnLM
    from knnlm_vdb.corpus import read_corpora

    backend, locations = resolve_locations(datastores, backend, uri, domains)
    if max_tokens is not None and max_tokens < 1:
        raise KnnlmError(f"--max-tokens must be positive, got {max_tokens}")
    from knnlm_vdb.knn import check_params

    lam = parse_lambda(lmbda)
    check_params(lmbda=None if lam == "auto" else lam, k=k, temperature=temperature)
    read_corpora(corpus)  # bad input fails before the model loads (a missing store failed in location_options)
    encoder = make_encoder(model, key_type, ctx, stride, batch_size, device, dtype)
    with KnnLM(encoder, open_stores(backend, locations, uri, consistency, encoder), k=k, temperature=temperature,
               lmbda=lmbda, skip_below=skip_below, cache=cache) as lm:
        settings = lm.settings()
        k, temperature, lmbda = settings.k, settings.temperature, settings.lmbda
        cached = ", with the in-document cache" if settings.adaptive and settings.cache is not None else ""
        result = lm.evaluate(read_token_sequences(encoder, corpus, max_tokens), show_progress=not as_json).to_dict()
    result["datastores"] = locations
    result["backend"] = backend
    emit(result, as_json, [
        f"tokens          {result['tokens']:,}",
        f"base LM         perplexity {result['base_ppl']:.3f}   {result['base_tokens_per_s']:.0f} tokens/s",
        f"kNN-LM          perplexity {result['knnlm_ppl']:.3f}   {result['knnlm_tokens_per_s']:.0f} tokens/s "
        f"(k={k}, T={temperature}, λ={lmbda}{cached}; retrieval {result['retrieval_seconds']:.1f}s, "
        f"{100 * result['searched_fraction']:.0f}% of tokens searched)",
    ])


@main.command()
@model_options
@location_options(multiple=False)
@click.option("--valid", "corpus", multiple=True, required=True, type=click.Path(), help="validation text")
@click.option("--max-tokens", type=int, default=None, help="score at most this many validation tokens")
@click.option("--max-k", type=int, default=1024, show_default=True, help="largest k tried")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="also fit the per-token λ gate used by --lambda auto")
@click.option("--json", "as_json", is_flag=True)
def tune(model, key_type, ctx, stride, batch_size, device, dtype, datastores, backend, uri, domains, consistency,
         corpus, max_tokens, max_k, adaptive, as_json):
    """Pick k, T and λ on validation text and store them with the datastore."""
    from knnlm_vdb.api import KnnLM

    from knnlm_vdb.corpus import read_corpora

    backend, locations = resolve_locations(datastores, backend, uri, domains)
    read_corpora(corpus)
    encoder = make_encoder(model, key_type, ctx, stride, batch_size, device, dtype)
    with KnnLM(encoder, open_stores(backend, locations, uri, consistency, encoder)) as lm:
        payload = lm.tune(read_token_sequences(encoder, corpus, max_tokens), max_k=max_k, adaptive=adaptive,
                          show_progress=not as_json)
    best = payload["best"]
    lines = [f"validation tokens {payload['tokens']:,}: base perplexity {payload['base_ppl']:.3f} -> kNN-LM "
             f"{best['ppl']:.3f} with k={best['k']} T={best['temperature']} λ={best['lambda']}"]
    if adaptive:
        auto = payload["auto"]
        lines.append(f"adaptive λ (--lambda auto): kNN-LM {auto['valid_auto_ppl']:.3f}, "
                     f"search skipped for {100 * auto['valid_skipped']:.0f}% of tokens")
        c = payload["cache"]
        lines.append(f"in-document cache alone (k={c['k']} T={c['temperature']}): adaptive {c['valid_auto_ppl']:.3f}")
    lines.append("stored with the datastore; eval and serve use " + ("--lambda auto" if adaptive else "these")
                 + " by default")
    emit({k: v for k, v in payload.items() if k not in ("calibration", "cache_calibration", "grid")}, as_json, lines)


@main.command()
@click.option("--backend", type=click.Choice(BACKENDS), default="milvus", show_default=True,
              help="milvus runs on Milvus Lite (an embedded local file)")
@click.option("--workdir", type=click.Path(), default="./knnlm-demo", show_default=True)
@opt("model")
@click.option("--json", "as_json", is_flag=True)
def demo(backend, workdir, model, as_json):
    """Build a datastore from the bundled sample, tune on one held-out part, score another."""
    from knnlm_vdb.demo import run_demo

    result = run_demo(Path(workdir), backend=backend, model=model, show_progress=not as_json)
    r = result
    emit(r, as_json, [
        "",
        f"datastore   {r['datastore_entries']:,} entries ({r['backend']}) from {r['train_file']}",
        f"tuned on    {r['valid_tokens']:,} held-out tokens: k={r['k']} T={r['temperature']} λ={r['lambda']}",
        f"test        {r['tokens']:,} other held-out tokens",
        f"  base LM           perplexity {r['base_ppl']:.3f}",
        f"  kNN-LM, fixed λ   perplexity {r['knnlm_ppl']:.3f}  ({100 * (r['knnlm_ppl'] / r['base_ppl'] - 1):+.1f}%)",
        f"  kNN-LM, λ auto    perplexity {r['auto_no_cache_knnlm_ppl']:.3f}  "
        f"({100 * (r['auto_no_cache_knnlm_ppl'] / r['base_ppl'] - 1):+.1f}%)",
        f"    + in-document cache     {r['auto_knnlm_ppl']:.3f}  "
        f"({100 * (r['auto_knnlm_ppl'] / r['base_ppl'] - 1):+.1f}%, "
        f"{100 * (1 - r['auto_searched_fraction']):.0f}% of datastore searches skipped)",
        f"greedy continuation of the test chapter's opening ...{r['prompt'][-60:]!r}",
        f"  base LM           {r['completions']['base']!r}",
        f"  kNN-LM, λ auto    {r['completions']['auto']!r}",
        f"total {r['seconds']:.0f}s",
    ])


# ---- commands that live beside the concept they drive ------------------------------------------
# (each line: `from knnlm_vdb.X import cmd; main.add_command(cmd)`)
from knnlm_vdb.service.commands import serve, score  # noqa: E402
main.add_command(serve)
main.add_command(score)
from knnlm_vdb.admin import domains, migrate, reindex  # noqa: E402
main.add_command(domains)
main.add_command(migrate)
main.add_command(reindex)
from knnlm_vdb.check import check  # noqa: E402
main.add_command(check)
main.add_command(check, name="fsck")
from knnlm_vdb.cli_generate import generate  # noqa: E402
main.add_command(generate)
