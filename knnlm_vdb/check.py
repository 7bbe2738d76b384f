"""``knnlm-vdb check`` (alias ``fsck``): verify a datastore read-only, and repair what is safe.

The same checks refuse a damaged datastore on open (datastore/faiss_check.py); ``check``
runs them without refusing, adds a full scan of the contents, and reports counts, damage
by name and bytes per entry. ``--repair`` only ever removes what no committed row needs
(uncommitted tail bytes) or rebuilds what is derived from the rows (the IVFPQ index); it
never invents rows, so a file shorter than its committed rows stays damaged.
Exit 0: healthy (notes allowed); 2: damaged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import numpy as np

from knnlm_vdb.cli_common import emit, milvus_options, opt
from knnlm_vdb.errors import Incompatible, InvalidInput, KnnlmError, NotFound

log = logging.getLogger(__name__)

def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def check_faiss(path: str | Path) -> dict:
    """A report on a FAISS datastore directory: counts, files, damage and notes. Writes nothing."""
    from knnlm_vdb.datastore import faiss_check as fc

    path = Path(path)
    if not (path / "meta.json").is_file():
        raise NotFound(f"no FAISS datastore at {path} (missing meta.json)")
    report = {"backend": "faiss", "path": str(path), "count": None, "files": {}}
    meta, found = fc.load_meta(path)
    if not found:
        found = fc.check_meta(meta)
    if not found:
        n = meta["count"]
        found = fc.check_sizes(path, meta) + fc.check_index_meta(path, meta)
        ledger_found, docs = fc.check_ledger(path, n)
        found += ledger_found
        if not any(f.damage and f.name.split(":")[0] in fc.ROW_FILES for f in found):
            found += fc.check_contents(path, meta, docs)
        widths = fc.row_widths(meta)
        report.update(count=n, dim=meta["info"]["dim"], key_dtype=meta["key_dtype"], index=meta["index"]["type"],
                      indexed_count=meta["index"]["indexed_count"], domain=meta.get("domain", "default"),
                      ledger_documents=len(docs or {}), ledger_rows=fc.ledger_rows(docs or {}),
                      row_bytes_per_entry=sum(widths.values()))
        disk = _disk_bytes(path)
        report["bytes_on_disk"] = disk
        report["bytes_per_entry"] = round(disk / n, 1) if n else None
    for p in sorted(path.iterdir()):
        if p.is_file():
            report["files"][p.name] = p.stat().st_size
    report["damage"] = [f.to_dict() for f in found if f.damage]
    report["notes"] = [f.to_dict() for f in found if not f.damage]
    report["healthy"] = not report["damage"]
    return report


def repair_faiss(path: str | Path, report: dict) -> list[str]:
    """Apply the safe repairs ``report`` lists; -> what was done. Refuses when damage remains
    that has no safe repair (the rows are gone: rebuild or restore instead)."""
    from knnlm_vdb.datastore import faiss_check as fc
    from knnlm_vdb.datastore.faiss_store import FaissDatastore
    from knnlm_vdb.io import atomic_write_json

    path = Path(path)
    hopeless = [d for d in report["damage"] if not d["repair"]]
    if hopeless:
        raise unrepairable(path, hopeless)
    done = []
    meta, _ = fc.load_meta(path)
    for note in report["notes"]:
        name = note["name"].split(":")[0]
        if note["name"].endswith(":uncommitted_tail"):
            size = meta["count"] * fc.row_widths(meta)[name]
            with open(path / name, "r+b") as f:
                if os.fstat(f.fileno()).st_size > size:  # only ever shorten
                    f.truncate(size)
                    f.flush()
                    os.fsync(f.fileno())
            done.append(f"cut {name} back to the {meta['count']} committed rows ({size} bytes)")
    if any(d["repair"] == fc.FORGET_REPAIR for d in report["damage"]):
        from knnlm_vdb.datastore.ledger import JsonLedger

        ledger = JsonLedger(path / "ledger.json")
        ids = np.fromfile(path / "ids.bin", dtype=np.int64, count=meta["count"])
        missing = fc.docs_missing_rows(meta, ledger.documents(), ids)
        for doc_id in missing:
            ledger.forget(doc_id)
        done.append(f"forgot {len(missing)} document(s) with missing rows in the ledger; append them again")
    if any(d["repair"] == fc.INDEX_REPAIR for d in report["damage"]):
        (path / "index.faiss").unlink(missing_ok=True)
        meta["index"]["indexed_count"] = 0
        atomic_write_json(path / "meta.json", meta)
        FaissDatastore(path).train()
        done.append(f"retrained the IVFPQ index over the {meta['count']} stored keys")
    return done


def unrepairable(path: Path, damage: list[dict]) -> KnnlmError:
    from knnlm_vdb.datastore.faiss_check import REBUILD_HINT

    return Incompatible(f"cannot repair {path} (no safe repair, rows are lost): {damage[0]['message']}; "
                        f"{REBUILD_HINT}")


def check_milvus(uri: str, domain: str, token: str | None = None) -> dict:
    """A report on a Milvus domain: its metadata, entry count against the ledger, index state.
    Opening a domain only reads (it never creates a database or a collection)."""
    from knnlm_vdb.datastore import open_store
    from knnlm_vdb.datastore.faiss_check import Finding, ledger_rows

    report = {"backend": "milvus", "uri": uri, "domain": domain, "count": None, "bytes_per_entry": None}
    try:
        store = open_store("milvus", uri, domain=domain, token=token)
    except Incompatible as exc:  # damaged metadata: report it rather than refuse
        report.update(damage=[Finding("meta:invalid", str(exc)).to_dict()], notes=[], healthy=False)
        return report
    found = []
    try:
        desc = store.describe()
        n = desc["count"]
        docs = store.ledger().documents()
        claimed = ledger_rows(docs)
        if claimed > n:
            found.append(Finding("ledger:ahead_of_rows", f"the ledger records {claimed} committed rows, the "
                                                         f"collection holds {n}"))
        index = desc.get("index") or {}
        if str(index.get("state", "")).lower() == "failed" or "error" in index:
            found.append(Finding("index:failed", f"the vector index is not usable: "
                                                 f"{index.get('error') or index.get('state')}"))
        elif index.get("pending_index_rows"):
            found.append(Finding("index:pending", f"{index['pending_index_rows']} rows are not indexed yet (searched "
                                                  f"by brute force until Milvus indexes them)", damage=False))
    finally:
        store.close()
    report.update(count=n, dim=desc["dim"], model=desc["model"], index=desc.get("index"),
                  collection=desc.get("collection"), ledger_documents=len(docs), ledger_rows=claimed,
                  # key float32 (projected: its stored dim), id, target, position (+ doc_id)
                  row_bytes_per_entry=4 * desc.get("stored_dim", desc["dim"]) + 8 + 4 + 8,
                  damage=[f.to_dict() for f in found if f.damage], notes=[f.to_dict() for f in found if not f.damage])
    report["healthy"] = not report["damage"]
    return report


def _lines(report: dict, repaired: list[str]) -> list[str]:
    where = report.get("path") or f"{report['uri']} domain {report['domain']}"
    state = "healthy" if report["healthy"] else "DAMAGED"
    lines = [f"{report['backend']} datastore {where}: {state}"]
    if report.get("count") is not None:
        bpe = report.get("bytes_per_entry")
        lines.append(f"  entries {report['count']:,} (dim {report.get('dim')}), ledger rows {report.get('ledger_rows')}"
                     + (f", {bpe:,} bytes per entry on disk" if bpe else "")
                     + (f", {report['row_bytes_per_entry']} bytes per row" if report.get("row_bytes_per_entry") else ""))
    lines += [f"  damage   {d['name']}: {d['message']}" + (f" [repair: {d['repair']}]" if d["repair"] else "")
              for d in report["damage"]]
    lines += [f"  note     {d['name']}: {d['message']}" for d in report["notes"]]
    lines += [f"  repaired {r}" for r in repaired]
    if not report["healthy"]:
        fixable = all(d["repair"] for d in report["damage"])
        lines.append("  fix: " + ("run again with --repair" if fixable else
                                  "no safe repair: restore from a backup or rebuild with `knnlm-vdb build`"))
    return lines


@click.command()
@click.option("--datastore", type=click.Path(), default=None, help="FAISS datastore directory")
@opt("uri", help="Milvus: local file (Milvus Lite) or http://host:19530")
@click.option("--domain", default=None, help="Milvus domain (collection) to check")
@click.option("--repair", is_flag=True, help="apply the safe repairs (cut uncommitted tails, retrain the index)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def check(ctx, datastore, uri, domain, repair, as_json):
    """Verify a datastore read-only: counts, damage by name, bytes per entry. Exit 2 when damaged."""
    if datastore and domain:
        raise InvalidInput("give either --datastore DIR (FAISS) or --uri U --domain D (Milvus), not both")
    repaired: list[str] = []
    if datastore:
        report = check_faiss(datastore)
        if repair and (report["damage"] or report["notes"]):
            repaired = repair_faiss(datastore, report)
            report = check_faiss(datastore)
    else:
        if not domain:
            raise InvalidInput("check needs --datastore DIR or --domain D (with --uri)")
        if repair:
            raise InvalidInput("--repair is for FAISS datastores; a Milvus domain has no safe repair to apply")
        report = check_milvus(uri, domain, token=milvus_options()["token"])
    report["repaired"] = repaired
    emit(report, as_json, _lines(report, repaired))
    ctx.exit(0 if report["healthy"] else 2)
