"""Read corpora: plain text files (one document each) or JSONL (``{"id", "text"}`` per line).

Input is checked here, once, so a missing, empty or binary file is a one-line error
rather than a failure deep inside the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from knnlm_vdb.errors import KnnlmError


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise KnnlmError(f"corpus file not found: {path}")
    if not path.is_file():
        raise KnnlmError(f"corpus path is not a file: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise KnnlmError(f"corpus file looks binary (contains NUL bytes): {path}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KnnlmError(f"corpus file is not UTF-8 text ({exc.reason} at byte {exc.start}): {path}") from None
    if not text.strip():
        raise KnnlmError(f"corpus file is empty: {path}")
    return text


def read_documents(path: str | Path) -> list[Document]:
    """Documents of one corpus file; their ids are stable, so re-reading gives the same ids."""
    path = Path(path)
    text = _read_text(path)
    if path.suffix != ".jsonl":
        return [Document(doc_id=path.name, text=text)]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            doc = Document(doc_id=str(rec["id"]), text=str(rec["text"]))
        except (ValueError, KeyError, TypeError):
            raise KnnlmError(f'{path}:{lineno}: expected a JSON object with "id" and "text"') from None
        if doc.text.strip():
            docs.append(doc)
    if not docs:
        raise KnnlmError(f"corpus file has no non-empty documents: {path}")
    seen = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise KnnlmError(f"{path}: document id {doc.doc_id!r} appears twice")
        seen.add(doc.doc_id)
    return docs


def read_corpora(paths) -> list[Document]:
    docs = []
    for p in paths:
        docs.extend(read_documents(p))
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise KnnlmError(f"document id {dup!r} appears in more than one corpus file")
    return docs
