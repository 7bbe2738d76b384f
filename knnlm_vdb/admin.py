"""Administration commands for Milvus databases: ``domains``, ``migrate``, ``reindex``.

None of them loads a model: they need only ``--uri`` (env ``KNNLM_URI``, default ``./knnlm.db``)
and, for a server with authentication, the token in ``$KNNLM_MILVUS_TOKEN``.
"""
from __future__ import annotations

import re

import click

from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.settings import DEFAULTS, env_name


def _uri_option(default=DEFAULTS["uri"], envvar=env_name("uri")):
    return click.option("--uri", default=default, envvar=envvar, show_default=default is not None,
                        help="Milvus: local file (Milvus Lite) or http://host:19530[/db]; token from "
                             "$KNNLM_MILVUS_TOKEN")


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="print the result as JSON")(f)


def _conn() -> dict:
    from knnlm_vdb.cli_common import milvus_options

    return milvus_options()


def _emit(payload, as_json: bool, lines: list[str]) -> None:
    from knnlm_vdb.cli_common import emit

    emit(payload, as_json, lines)


def _summary(index: dict) -> str:
    from knnlm_vdb.cli_common import index_summary

    return index_summary({"type": index.get("type"), **index.get("build_params", {}),
                          **{f"search.{k}": v for k, v in (index.get("search_params") or {}).items()}})


# ---- domains ---------------------------------------------------------------------------------
@click.group(name="domains")
def domains() -> None:
    """List, describe and drop the domains of a Milvus database."""


@domains.command(name="list")
@_uri_option()
@_json_option
def domains_list(uri, as_json):
    """The domains stored at --uri, one a line."""
    from knnlm_vdb.datastore.milvus import list_domains, redact_uri

    names = list_domains(uri, **_conn())
    _emit({"uri": redact_uri(uri), "domains": names}, as_json, names)


def describe_domain(uri: str, domain: str, **conn) -> dict:
    """``MilvusDatastore.describe()`` plus the domain's collections, ledger size and schema version."""
    from knnlm_vdb.datastore.milvus.catalog import domain_collections, properties
    from knnlm_vdb.datastore.milvus.connection import rpc
    from knnlm_vdb.datastore.milvus.naming import RETIRED_PROPERTY
    from knnlm_vdb.datastore.milvus.store import MilvusDatastore
    from knnlm_vdb.datastore.milvus.versions import read_schema_state

    with MilvusDatastore.open(uri, domain, **conn) as store:
        desc = store.describe()
        with rpc(f"describe domain {domain}", uri):
            names = domain_collections(store.client).get(domain, [])
            desc["collections"] = [
                {"name": n, "serving": n == desc["collection"],
                 "retired": RETIRED_PROPERTY in properties(store.client, n)} for n in names]
            state = read_schema_state(store.client)
        desc["schema_version"] = int(state["version"]) if state else 0
        desc["ledger_documents"] = len(store.ledger().documents())
    return desc


@domains.command(name="describe")
@click.argument("domain")
@_uri_option()
@_json_option
def domains_describe(domain, uri, as_json):
    """Count, dimension, model, key type, index and tuned settings of DOMAIN."""
    d = describe_domain(uri, domain, **_conn())
    tuned = d["extra"].get("tuned")
    lines = [
        f"domain      {d['domain']} at {d['uri']} ({d['deployment']})",
        f"collection  {d['collection']}" + (f" (alias {d['alias']})" if d.get("alias") else ""),
        f"entries     {d['count']:,}",
        f"model       {d['model']} (key {d['key_type']}, dim {d['dim']}, vocab {d['vocab_size']})",
        f"index       {_summary(d['index'])}",
        f"documents   {d['ledger_documents']:,} in the ingest ledger",
        "tuned       " + (f"k={tuned['k']} T={tuned['temperature']} λ={tuned['lambda']}" if tuned else "no"),
        f"schema      version {d['schema_version']}",
    ]
    others = [c["name"] + (" (retired)" if c["retired"] else "") for c in d["collections"] if not c["serving"]]
    if others:
        lines.append(f"also        {', '.join(others)}")
    _emit(d, as_json, lines)


@domains.command(name="drop")
@click.argument("domain")
@_uri_option()
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def domains_drop(domain, uri, yes):
    """Delete DOMAIN: its alias, collections (rows, index) and ingest ledger."""
    from knnlm_vdb.datastore.milvus import check_domain, drop_domain, list_domains, redact_uri

    check_domain(domain)
    if not yes:
        if domain not in list_domains(uri, **_conn()):
            raise KnnlmError(f"no domain {domain!r} at {redact_uri(uri)}")
        click.confirm(f"Drop domain {domain!r} at {redact_uri(uri)} and every entry in it?", abort=True)
    dropped = drop_domain(uri, domain, **_conn())
    click.echo(f"dropped domain {domain} ({', '.join(dropped)})")


# ---- migrate ---------------------------------------------------------------------------------
@click.group(name="migrate", invoke_without_command=True)
@_uri_option()
@click.option("--to", "to", type=int, default=None, help="stop at this schema version [default: the newest]")
@click.option("--dry-run", is_flag=True, help="list what would change, change nothing")
@_json_option
@click.pass_context
def migrate(ctx, uri, to, dry_run, as_json):
    """Bring the Milvus database's schema to the newest version (or --to N). Needs no model.

    `knnlm-vdb migrate status` shows the recorded version and what is pending.
    """
    ctx.obj = {"uri": uri}
    if ctx.invoked_subcommand is not None:
        return
    from knnlm_vdb.schema import migrate as run

    r = run(uri, to=to, dry_run=dry_run, **_conn())
    verb = "would apply" if dry_run else "applied"
    lines = []
    for step in r["applied"]:
        lines.append(f"{verb} {step['version']:04d} {step['name']}: {step['description']}")
        lines += [f"    {a}" for a in step["actions"]]
    if not r["applied"]:
        lines.append(f"{r['uri']} is at schema version {r['from']}: nothing to do")
    elif not dry_run:
        lines.append(f"{r['uri']}: schema version {r['from']} -> {r['to']}")
    _emit(r, as_json, lines)


@migrate.command(name="status")
@_uri_option(default=None, envvar=None)
@_json_option
@click.pass_context
def migrate_status(ctx, uri, as_json):
    """The database's schema version, the newest known, and pending migrations."""
    from knnlm_vdb.schema import status

    s = status(uri or ctx.obj["uri"], **_conn())
    lines = [f"{s['uri']}: schema version {s['version']}" + ("" if s["recorded"] else " (none recorded)")
             + f", newest known {s['latest']}"]
    if not s["exists"]:
        lines[0] += " (no database yet)"
    if s["newer_than_code"]:
        lines.append("the database is newer than this knnlm-vdb: upgrade knnlm-vdb")
    lines += [f"  applied {h['version']:04d} {h['name']} at {h.get('applied_at', '?')}" for h in s["history"]]
    lines += [f"  pending {p['version']:04d} {p['name']}: {p['description']}" for p in s["pending"]]
    _emit(s, as_json, lines)


# ---- reindex ---------------------------------------------------------------------------------
def parse_params(pairs, what: str) -> dict:
    """``("nlist=64", "build_algo=IVF_PQ")`` -> ``{"nlist": 64, "build_algo": "IVF_PQ"}``."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise KnnlmError(f"--{what} must look like name=value, got {pair!r}")
        value = value.strip()
        out[name.strip()] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return out


@click.command()
@_uri_option()
@click.option("--domain", required=True, help="the domain to rebuild")
@click.option("--index-type", required=True, help="FLAT, IVF_FLAT, HNSW, IVF_SQ8, IVF_PQ; GPU_* on a GPU server")
@click.option("--index-param", "index_params", multiple=True, metavar="NAME=VALUE",
              help="build parameter, e.g. nlist=1024 or M=16 (repeatable)")
@click.option("--search-param", "search_params", multiple=True, metavar="NAME=VALUE",
              help="search parameter stored with the domain, e.g. nprobe=32 or ef=256 (repeatable)")
@click.option("--keep-old", is_flag=True, help="keep the replaced collection (marked retired) instead of dropping it")
@click.option("--project-dim", type=int, default=None,
              help="also store the keys projected to this dimension (a PCA fitted on a sample of its keys)")
@_json_option
def reindex(uri, domain, index_type, index_params, search_params, keep_old, project_dim, as_json):
    """Rebuild DOMAIN with another index without downtime: a new collection, then an alias swap."""
    from knnlm_vdb.datastore.milvus.reindex import reindex as run

    r = run(uri, domain, index_type, parse_params(index_params, "index-param"),
            parse_params(search_params, "search-param"), keep_old=keep_old, show_progress=not as_json,
            project_dim=project_dim, **_conn())
    _emit(r, as_json, [
        f"domain {r['domain']}: {r['count']:,} entries now in {r['to']} ({_summary(r['index'])}), "
        f"copied in {r['copy_seconds']:.1f}s, indexed in {r['index_seconds']:.1f}s"
        + (f", {r['caught_up']} appended meanwhile" if r["caught_up"] else ""),
        f"{r['from']} " + ("kept (retired)" if r["kept_old"] else "dropped"),
    ])
