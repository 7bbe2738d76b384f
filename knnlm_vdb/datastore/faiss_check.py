"""Integrity of a FAISS datastore directory: what ``FaissDatastore`` verifies on open and
what ``knnlm-vdb check`` reports.

Flat files carry no checksums, so the checks are about agreement: the committed ``count`` in
meta.json against the length of every row file, the ledger's committed chunks against
``count``, the index against ``count``. A file SHORTER than the committed rows is damage:
nothing can bring the lost rows back, and padding them (the old ``truncate`` did) would make
every later search return zero keys without a word. A file LONGER than the committed rows
is the normal leftover of a writer that crashed before its commit, cut off on the next write.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from knnlm_vdb.datastore.base import info_damage, is_int, typed_damage
from knnlm_vdb.datastore.faiss_index import INDEX_TYPES, TRAINED
from knnlm_vdb.datastore.ledger import CHUNK_TARGETS, chunk_range
from knnlm_vdb.errors import Incompatible, NotFound
from knnlm_vdb.projection import stored_dim

KEY_DTYPES = {"float16": np.float16, "float32": np.float32}
ROW_FILES = ("keys.bin", "values.bin", "ids.bin")
_INDEX_FIELDS = {"type": str, "nprobe": int, "indexed_count": int}
INDEX_REPAIR = "retrain the IVFPQ index from the stored keys"
FORGET_REPAIR = "forget those documents in the ledger, so that the next append re-ingests them"
REBUILD_HINT = "restore it from a backup or rebuild it with `knnlm-vdb build`"


@dataclass
class Finding:
    """One problem: ``name`` is stable (tests and scripts match it), ``message`` is for people.

    ``damage``: opening is refused. Otherwise a note (e.g. uncommitted tail rows), harmless.
    ``repair``: what ``check --repair`` would do, or None when no safe repair exists.
    """

    name: str
    message: str
    damage: bool = True
    repair: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_meta(meta) -> list[Finding]:
    """Every field the datastore needs, of the right type."""
    if not isinstance(meta, dict):
        return [Finding("meta.json:not_an_object", "meta.json does not hold a JSON object")]
    out = []

    def missing(field: str, want: str) -> None:
        out.append(Finding(f"meta.json:{field}", f"meta.json field {field} is missing or not {want}"))

    info = meta.get("info")
    if not isinstance(info, dict):
        missing("info", "an object")
    else:
        for field, want in info_damage(info):
            missing(f"info.{field}", want)
    if meta.get("key_dtype") not in KEY_DTYPES:
        missing("key_dtype", "float16 or float32")
    if not is_int(meta.get("count")) or meta["count"] < 0:
        missing("count", "a non-negative int")
    if not is_int(meta.get("format_version", 0)):
        missing("format_version", "an int")
    index = meta.get("index")
    if not isinstance(index, dict):
        missing("index", "an object")
    else:
        for field, want in typed_damage(index, _INDEX_FIELDS):
            missing(f"index.{field}", want)
        if index.get("type") not in INDEX_TYPES:
            missing("index.type", " or ".join(INDEX_TYPES))
    proj = meta.get("projection")
    if proj is not None and (not isinstance(proj, dict) or typed_damage(proj, {"dim_in": int, "dim_out": int})):
        missing("projection", "an object with int dim_in and dim_out")
    return out


def row_widths(meta: dict) -> dict[str, int]:
    """Bytes per row of each row file."""
    key_width = stored_dim(meta) * np.dtype(KEY_DTYPES[meta["key_dtype"]]).itemsize
    return {"keys.bin": key_width, "values.bin": 4, "ids.bin": 8}


def check_sizes(path: Path, meta: dict) -> list[Finding]:
    """Each row file holds at least the committed rows, in whole rows."""
    n, out = meta["count"], []
    for name, width in row_widths(meta).items():
        p = path / name
        if not p.is_file():
            out.append(Finding(f"{name}:missing", f"{name} is missing ({n} committed rows)"))
            continue
        size = p.stat().st_size
        if size < n * width:
            out.append(Finding(f"{name}:short", f"{name} has {size} bytes, the {n} committed rows need {n * width} "
                                                f"({n - size // width} rows lost)"))
        elif size > n * width:
            out.append(Finding(f"{name}:uncommitted_tail",
                               f"{name} has {size - n * width} bytes past the {n} committed rows (left by an "
                               f"interrupted write; cut off by the next append)", damage=False,
                               repair=f"truncate {name} to {n * width} bytes"))
    return out


def ledger_rows(docs: dict) -> int:
    """Rows the ledger's committed chunks account for (each target position is one row)."""
    total = 0
    for rec in docs.values():
        for c in rec.chunks:
            lo, hi = chunk_range(c, CHUNK_TARGETS, rec.n_tokens)
            total += max(0, hi - lo)
    return total


def check_ledger(path: Path, count: int) -> tuple[list[Finding], dict | None]:
    """-> (findings, documents or None when unreadable). A ledger may claim fewer rows than
    ``count`` (a crash between store and ledger, a chunk cut by --max-tokens), never more."""
    from knnlm_vdb.datastore.ledger import JsonLedger

    p = path / "ledger.json"
    if not p.exists():
        return [], {}
    try:
        docs = JsonLedger(p).documents()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return [Finding("ledger.json:unreadable", f"ledger.json is not a valid ledger ({type(exc).__name__}: {exc})")], None
    claimed = ledger_rows(docs)
    if claimed > count:  # also the window of an interrupted `append --replace` (rows deleted, ledger not yet)
        return [Finding("ledger.json:ahead_of_rows", f"ledger.json records {claimed} committed rows, meta.json "
                                                     f"only {count}", damage=False)], docs
    return [], docs


def docs_missing_rows(meta: dict, docs: dict, ids: np.ndarray) -> dict[str, int]:
    """Documents whose committed chunks have rows that are not stored -> how many are missing."""
    from knnlm_vdb.datastore.base import entry_ids

    have = set(ids.tolist())
    domain = meta.get("domain", "default")
    out = {}
    for doc_id, rec in docs.items():
        lost = 0
        for c in rec.chunks:
            lo, hi = chunk_range(c, CHUNK_TARGETS, rec.n_tokens)
            lost += sum(int(i) not in have for i in entry_ids(domain, doc_id, np.arange(lo, hi)))
        if lost:
            out[doc_id] = lost
    return out


def check_index_meta(path: Path, meta: dict) -> list[Finding]:
    """The index bookkeeping in meta.json agrees with the files (cheap: no index is read)."""
    spec, n = meta["index"], meta["count"]
    out = []
    if spec["indexed_count"] > n:
        out.append(Finding("index:ahead_of_rows", f"meta.json says {spec['indexed_count']} rows are indexed, "
                                                  f"but only {n} are committed"))
    if spec["type"] in TRAINED and spec["indexed_count"] > 0 and not (path / "index.faiss").is_file():
        out.append(Finding("index.faiss:missing", f"index.faiss is missing ({spec['indexed_count']} rows were "
                                                  f"indexed)", repair=INDEX_REPAIR))
    return out


def check_on_open(path: Path, meta) -> list[Finding]:
    """The cheap checks every open runs: meta fields, file sizes, ledger, index bookkeeping."""
    found = check_meta(meta)
    if found:
        return found
    found = check_sizes(path, meta) + check_index_meta(path, meta)
    found += check_ledger(path, meta["count"])[0]
    return found


def refusal(path: Path, damage: list[Finding]) -> str:
    """One line for a refused open: the first damage, how many more, and what to do."""
    more = f" (and {len(damage) - 1} more problem(s))" if len(damage) > 1 else ""
    repairable = all(f.repair for f in damage)
    hint = (f"run `knnlm-vdb check --repair --datastore {path}`" if repairable else
            f"see `knnlm-vdb check --datastore {path}`; {REBUILD_HINT}")
    return f"FAISS datastore {path} is damaged: {damage[0].message}{more}; {hint}"


def open_meta(path: Path, format_version: int) -> dict:
    """meta.json of a datastore that passes the checks every open runs; else NotFound/Incompatible."""
    if not (path / "meta.json").is_file():
        raise NotFound(f"no FAISS datastore at {path} (missing meta.json); build one with `knnlm-vdb build`")
    meta, found = load_meta(path)
    if isinstance(meta, dict) and is_int(meta.get("format_version", 0)) and meta.get("format_version", 0) > format_version:
        raise Incompatible(f"datastore {path} has format {meta['format_version']}, newer than this "
                           f"knnlm-vdb understands ({format_version}); upgrade knnlm-vdb")
    damage = [f for f in (found or check_on_open(path, meta)) if f.damage]
    if damage:
        raise Incompatible(refusal(path, damage))
    return meta


def load_meta(path: Path) -> tuple[dict | None, list[Finding]]:
    meta_path = path / "meta.json"
    try:
        return json.loads(meta_path.read_text()), []
    except (ValueError, UnicodeDecodeError) as exc:
        return None, [Finding("meta.json:unreadable", f"meta.json is not valid JSON ({exc})")]
    except OSError as exc:
        return None, [Finding("meta.json:unreadable", f"cannot read meta.json ({exc.strerror})")]


def check_contents(path: Path, meta: dict, docs: dict | None, chunk: int = 1 << 16) -> list[Finding]:
    """The full scan ``check`` adds: values in the vocabulary, ids positive and distinct, keys
    finite, the ledger's rows present, the index readable and no larger than the rows."""
    n, dim, vocab = meta["count"], stored_dim(meta), meta["info"]["vocab_size"]
    out = []
    values = np.fromfile(path / "values.bin", dtype=np.int32, count=n)
    bad = int(((values < 0) | (values >= vocab)).sum())
    if bad:
        out.append(Finding("values.bin:out_of_vocabulary", f"{bad} of {n} values are outside [0, {vocab})"))
    ids = np.fromfile(path / "ids.bin", dtype=np.int64, count=n)
    if (ids < 0).any() or len(np.unique(ids)) != n:
        out.append(Finding("ids.bin:invalid", f"ids.bin holds {int((ids < 0).sum())} negative and "
                                              f"{n - len(np.unique(ids))} repeated ids"))
    if n:
        keys = np.memmap(path / "keys.bin", dtype=KEY_DTYPES[meta["key_dtype"]], mode="r", shape=(n, dim))
        nonfinite = sum(int((~np.isfinite(np.asarray(keys[i:i + chunk]))).any(axis=1).sum())
                        for i in range(0, n, chunk))
        if nonfinite:
            out.append(Finding("keys.bin:non_finite", f"{nonfinite} of {n} keys hold NaN or infinite values"))
    missing = docs_missing_rows(meta, docs or {}, ids)
    if missing:
        names = ", ".join(repr(d) for d in list(missing)[:3]) + (" ..." if len(missing) > 3 else "")
        out.append(Finding("ledger.json:rows_missing", f"{sum(missing.values())} rows of {len(missing)} document(s) "
                                                       f"the ledger calls committed are not stored ({names})",
                           repair=FORGET_REPAIR))
    if (path / "index.faiss").is_file():
        found = read_index(path, n, dim)[1]
        out += [found] if found else []
    return out


def read_index(path: Path, n: int, dim: int):
    """-> (the index or None, a Finding when index.faiss is unreadable or does not fit the rows)."""
    import faiss

    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as exc:
        return None, Finding("index.faiss:unreadable", f"index.faiss cannot be read ({str(exc).splitlines()[0][:200]})",
                             repair=INDEX_REPAIR)
    if index.d != dim or index.ntotal > n:
        return index, Finding("index.faiss:mismatch", f"index.faiss has {index.ntotal} rows of dimension {index.d}; "
                                                      f"the datastore {n} of dimension {dim}", repair=INDEX_REPAIR)
    return index, None
