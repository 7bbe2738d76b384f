"""Names and layout of knnlm-vdb's Milvus collections: no Milvus calls here.

A domain ``D`` (letters and digits, words joined by single underscores, at most 64
characters) is read and written through the alias ``knnlm_D``, which points at the collection
``knnlm_D__v1``. A reindex builds ``knnlm_D__v2`` and swaps the alias, so readers never see a
half-built index. Where the server has no aliases (older Milvus Lite builds) the collection
itself is called ``knnlm_D``. Double underscores are not allowed in domain names, so
``__v<N>`` can never be mistaken for part of a domain. The ingest ledger is ``knnlm_D__ledger``
and the database's schema record ``knnlm__schema``.

Row schema: ``id`` INT64 primary key (``base.entry_ids``), ``key`` FLOAT_VECTOR(dim), ``target``
INT32 (the next token), ``doc_id`` VARCHAR(1024), ``position`` INT64. Metadata lives in the
collection property ``knnlm.meta``: JSON ``{format_version, domain, info, index}``.
"""
from __future__ import annotations

import re

from knnlm_vdb.errors import InvalidInput

FORMAT_VERSION = 1
PREFIX = "knnlm_"
META_PROPERTY = "knnlm.meta"
DOC_ID_MAX_BYTES = 1024
ROW_FIELDS = ["id", "key", "target", "doc_id", "position"]
# Database-wide schema record (schema.py). "knnlm_" + a domain never contains "__" right after the
# prefix, so no domain's alias can collide with it.
SCHEMA_COLLECTION = "knnlm__schema"
SCHEMA_PROPERTY = "knnlm.schema"
CREATE_TOKEN_PROPERTY = "knnlm.create_token"  # which of several racing creators made a collection
RETIRED_PROPERTY = "knnlm.retired"  # set on a generation a reindex replaced but kept (--keep-old)
LEDGER_OF_PROPERTY = "knnlm.ledger_of"
# Framing, id, target and position of one row besides its key and doc_id, rounded up.
ROW_OVERHEAD_BYTES = 64
TYPICAL_DOC_ID_BYTES = 256

_DOMAIN_RE = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*")


def check_domain(domain: str) -> str:
    """A domain name usable inside a collection name; refuse anything else with a clear message."""
    if not isinstance(domain, str) or len(domain) > 64 or not _DOMAIN_RE.fullmatch(domain):
        raise InvalidInput(f"invalid domain {domain!r}: use letters and digits, words joined by single "
                         f"underscores, at most 64 characters (e.g. python_docs)")
    return domain


def alias_name(domain: str) -> str:
    """Name readers use for a domain: an alias, or the collection itself without alias support."""
    return PREFIX + check_domain(domain)


def collection_name(domain: str, generation: int = 1) -> str:
    """Physical collection behind the alias of ``domain``."""
    return f"{alias_name(domain)}__v{generation}"


def generation_pattern(domain: str) -> re.Pattern:
    """Matches the physical collections of ``domain``; group 1 is the generation."""
    return re.compile(re.escape(alias_name(domain)) + r"__v(\d+)")


def ledger_name(domain: str) -> str:
    """Collection holding the ingest ledger of ``domain``."""
    return f"{alias_name(domain)}__ledger"


def row_bytes(dim: int, doc_id_bytes: int = TYPICAL_DOC_ID_BYTES) -> int:
    """Bytes one row takes on the wire: sizes insert and copy batches (one estimate for all)."""
    return 4 * dim + ROW_OVERHEAD_BYTES + doc_id_bytes
