"""The small interface every datastore backend implements, and what they share.

A datastore maps keys (LM hidden states) to values (the next token). Backends differ
only behind ``add`` / ``search`` / ``count`` / ``describe`` / ``finalize``; index-specific
knobs live in their index parameters. Every backend also says which id ``domain`` its entry
ids belong to (``entry_ids``), so a caller never has to work it out, and reads the settings
``tune`` stored with it as typed values (``tuned()``, ``calibration()``). A new backend passes
``tests/test_backend_contract.py``.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np

from knnlm_vdb.errors import Incompatible, KnnlmError

MISSING_VALUE = -1  # value of a neighbour slot that a store could not fill


@dataclass
class StoreInfo:
    """What a datastore was built with; queries from any other LM would be meaningless."""

    model: str
    key_type: str
    dim: int
    tokenizer: str  # fingerprint of the vocabulary, see LoadedLM.tokenizer_fingerprint
    vocab_size: int
    extra: dict = field(default_factory=dict)  # tuned settings, calibration, ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StoreInfo":
        return cls(**{k: d[k] for k in ("model", "key_type", "dim", "tokenizer", "vocab_size")},
                   extra=dict(d.get("extra") or {}))

    @classmethod
    def for_encoder(cls, encoder) -> "StoreInfo":
        lm = encoder.lm
        return cls(model=lm.name, key_type=encoder.key_type, dim=lm.hidden_size,
                   tokenizer=lm.tokenizer_fingerprint(), vocab_size=lm.vocab_size)

    def check_compatible(self, other: "StoreInfo", where: str) -> None:
        """Refuse a datastore built by another model, key type, dimension or tokenizer."""
        for name in ("model", "dim", "key_type", "tokenizer"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise Incompatible(f"datastore {where} was built with {name}={mine!r} but the current "
                                 f"encoder has {name}={theirs!r}; use the same --model/--key-type or another datastore")


@dataclass(frozen=True)
class TunedSettings:
    """The fixed k, T and λ that ``tune`` found best on validation text (stored as ``extra["tuned"]``)."""

    k: int
    temperature: float
    lmbda: float
    valid_ppl: float | None = None
    valid_base_ppl: float | None = None
    valid_tokens: int | None = None

    def to_dict(self) -> dict:
        """The stored form (key ``lambda``, as releases before this class wrote it)."""
        d = {"k": self.k, "temperature": self.temperature, "lambda": self.lmbda, "valid_ppl": self.valid_ppl,
             "valid_base_ppl": self.valid_base_ppl, "valid_tokens": self.valid_tokens}
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "TunedSettings":
        try:
            return cls(k=int(d["k"]), temperature=float(d["temperature"]), lmbda=float(d["lambda"]),
                       valid_ppl=d.get("valid_ppl"), valid_base_ppl=d.get("valid_base_ppl"),
                       valid_tokens=d.get("valid_tokens"))
        except (KeyError, TypeError, ValueError):
            raise Incompatible(f"stored tuned settings are damaged: {d!r}; run `knnlm-vdb tune` again") from None


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def typed_damage(obj: dict, fields: dict) -> list[tuple[str, str]]:
    """-> (field, wanted type) for each of ``fields`` that ``obj`` lacks or holds with another type."""
    return [(name, typ.__name__) for name, typ in fields.items()
            if not isinstance(obj.get(name), typ) or (typ is int and not is_int(obj.get(name)))]


def info_damage(info: dict) -> list[tuple[str, str]]:
    """What a stored ``StoreInfo`` dict lacks (both backends refuse to open with any of it missing)."""
    out = typed_damage(info, {"model": str, "key_type": str, "dim": int, "tokenizer": str, "vocab_size": int})
    if is_int(info.get("dim")) and info["dim"] < 1:
        out.append(("dim", "a positive int"))
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def entry_ids(domain: str, doc_id: str, positions: np.ndarray) -> np.ndarray:
    """Deterministic, positive int64 ids from (domain, document, position).

    Re-ingesting the same document yields the same ids, which is what makes appends
    idempotent and lets shards run in parallel without coordination.
    """
    seed = int.from_bytes(hashlib.blake2b(f"{domain}\x00{doc_id}".encode(), digest_size=8).digest(), "little")
    mixed = _splitmix64(np.uint64(seed) + np.asarray(positions, dtype=np.uint64))
    return (mixed & np.uint64(0x7FFFFFFFFFFFFFFF)).astype(np.int64)


class Datastore(ABC):
    """Keys with their next-token values; searched by squared L2 distance."""

    info: StoreInfo

    @property
    @abstractmethod
    def domain(self) -> str:
        """The id domain: ``entry_ids(store.domain, ...)`` are this store's ids, so re-adding is a no-op."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store lives (a directory, or URI with the domain), safe to print."""

    @abstractmethod
    def add(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray,
            doc_ids: list[str] | None = None, positions: np.ndarray | None = None) -> int:
        """Insert rows whose ids are not stored yet; return how many were new."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared-L2 distances ``float32 [n, k]`` ascending and values ``int32 [n, k]``.

        Slots a store cannot fill have distance ``inf`` and value ``MISSING_VALUE``.
        """

    @abstractmethod
    def count(self) -> int:
        """Number of stored entries, as a reader sees it now."""

    @abstractmethod
    def describe(self) -> dict:
        """Facts for ``describe --json``: at least count, dim, model, key_type and index."""

    def entries(self, queries: np.ndarray, n: int) -> list[list[dict]]:
        """Provenance: each query's ``n`` nearest entries as dicts of ``domain``, ``doc_id``,
        ``position`` (of the token the entry predicts), ``distance`` and ``target``."""
        raise KnnlmError(f"{type(self).__name__} cannot say where its entries came from")

    def ledger(self):
        """The domain's ingest ledger (see ledger.py)."""
        raise KnnlmError(f"{type(self).__name__} keeps no ingest ledger")

    def delete_ids(self, ids: np.ndarray) -> int:
        """Remove entries by id (used by ``append --replace``); return how many were removed."""
        raise KnnlmError(f"{type(self).__name__} cannot delete entries")

    def set_extra(self, key: str, value) -> None:
        """Record a setting with the datastore (tuned λ/T/k, calibrations)."""
        raise KnnlmError(f"{type(self).__name__} cannot store settings")

    def flush(self) -> None:
        """Make everything added so far durable and visible."""

    def finalize(self) -> None:
        """After an ingest: make the store ready to search fast (train or seal its index). Idempotent."""
        self.flush()

    def tuned(self) -> TunedSettings | None:
        """The settings ``tune`` stored, or None."""
        raw = self.info.extra.get("tuned")
        return TunedSettings.from_dict(raw) if raw else None

    def calibration(self):
        """The adaptive-λ ``Calibration`` that ``tune`` stored, or None."""
        from knnlm_vdb.adaptive import Calibration

        raw = self.info.extra.get("calibration")
        return Calibration.from_dict(raw) if raw else None

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pad_results(distances: list[list[float]], values: list[list[int]], k: int,
                dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-query hits -> fixed ``[n, k]`` arrays with missing slots marked (inf, MISSING_VALUE)."""
    n = len(distances)
    d = np.full((n, k), np.inf, dtype=np.float32)
    v = np.full((n, k), MISSING_VALUE, dtype=dtype)
    for i, (di, vi) in enumerate(zip(distances, values)):
        m = min(len(di), k)
        d[i, :m] = di[:m]
        v[i, :m] = vi[:m]
    return d, v


def take_rows(dist: np.ndarray, rows: np.ndarray, column: np.ndarray, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """A FAISS answer (distances, row numbers with -1 where unfilled) -> (float32 distances with
    ``inf``, ``column[rows]`` with MISSING_VALUE) in the unfilled slots."""
    valid = rows >= 0
    values = np.where(valid, column[np.where(valid, rows, 0)], MISSING_VALUE).astype(dtype)
    return np.where(valid, dist, np.inf).astype(np.float32), values


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge several stores' top-k lists into one top-k by distance."""
    if len(results) == 1:
        return results[0]
    d = np.concatenate([r[0] for r in results], axis=1)
    v = np.concatenate([r[1] for r in results], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(v, order, 1)
