"""The keyword options of ``MilvusDatastore.open``/``create``, by kind: connection, index, transfer."""
from __future__ import annotations

from knnlm_vdb.errors import KnnlmError

CONN_OPTIONS = ("token", "timeout", "db_name")
INDEX_OPTIONS = ("index_type", "index_params", "search_params", "consistency", "k", "projection")
# How the store talks to Milvus (tests shrink the sizes to force many small requests); ``mirror``:
# read a Lite domain through an in-process copy (mirror.py).
TRANSFER_OPTIONS = ("rpc_budget_bytes", "insert_batch_bytes", "alias_wait_s", "mirror")
REOPEN_OPTIONS = CONN_OPTIONS + ("consistency", "k") + TRANSFER_OPTIONS


def split_options(options: dict) -> tuple[dict, dict, dict]:
    """``**options`` of open/create -> (connection, index, transfer) options; unknown names refused."""
    unknown = sorted(set(options) - set(CONN_OPTIONS) - set(INDEX_OPTIONS) - set(TRANSFER_OPTIONS))
    if unknown:
        raise KnnlmError(f"unknown Milvus option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(CONN_OPTIONS + INDEX_OPTIONS + TRANSFER_OPTIONS)}")
    conn = {k: options[k] for k in CONN_OPTIONS if k in options}
    idx = {k: options[k] for k in INDEX_OPTIONS if options.get(k) is not None}
    transfer = {k: options[k] for k in TRANSFER_OPTIONS if options.get(k) is not None}
    return conn, idx, transfer
