"""Read corpora: plain text files (one document each) or JSONL (``{"id", "text"}`` per line).

Input is checked here, once, so a missing, empty or binary file is a one-line error
rather than a failure deep inside the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from knnlm_vdb.errors import InvalidInput, KnnlmError

MAX_DOC_ID_BYTES = 1024  # what every backend can store (Milvus: VARCHAR(1024))


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


def _record(rec, where: str) -> Document:
    """A JSONL record -> Document, refusing anything ``str()`` would quietly turn into text:
    an id of null/list/dict/bool becomes "None" or "['a']", and so would such a text."""
    if not isinstance(rec, dict) or "id" not in rec or "text" not in rec:
        raise InvalidInput(f'{where}: expected a JSON object with "id" and "text"')
    doc_id, text = rec["id"], rec["text"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise InvalidInput(f'{where}: "id" must be a string or an integer, got {type(doc_id).__name__} '
                           f"{json.dumps(doc_id)[:40]}")
    if not isinstance(text, str):
        raise InvalidInput(f'{where}: "text" must be a string, got {type(text).__name__}')
    doc_id = str(doc_id)
    if not doc_id or len(doc_id.encode("utf-8")) > MAX_DOC_ID_BYTES:
        raise InvalidInput(f'{where}: "id" must be 1 to {MAX_DOC_ID_BYTES} bytes of UTF-8, got '
                           f"{len(doc_id.encode('utf-8'))}")
    return Document(doc_id=doc_id, text=text)


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
        except ValueError:
            raise InvalidInput(f'{path}:{lineno}: not valid JSON; expected an object with "id" and "text"') from None
        doc = _record(rec, f"{path}:{lineno}")
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
