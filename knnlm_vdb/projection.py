"""A learned linear projection of datastore keys (PCA), applied behind the Datastore interface.

Keys are searched by squared L2, so the projection is a centred PCA, randomly rotated so that
quantisers see balanced coordinates, with an orthonormal basis: ``P(x) = B (x - mu)`` with ``B Bᵀ = I``. Then ``|P(x) - P(q)|² = |x - q|²`` minus the
part of ``x - q`` in the discarded directions, which for neighbours of real keys is small when
the kept components hold most of the variance. Near neighbours, though, differ largely in the
low-variance directions a small projection drops (on pydocs keys, 576 -> 64 dimensions keeps 73%
of the variance but only ~30% of the nearest-neighbour distance), which would silently change
the kNN temperature. So ``fit`` also measures ``distance_scale``: full over projected squared
distance, summed over each sample query's nearest neighbours in the projected space; stores
multiply the distances they return by it, so distances (and T) stay on the model-space scale.
On the 408k pydocs store the exact store's k, T and λ carried over to its 32-byte copies better
than re-tuning them on 16,000 valid tokens, which picked a sharper T (benchmarks/compress.py).

The projection is fitted once at build from a sample of keys spread over the corpus
(``ingest.sample_keys``, then ``fit``) and stored with the store: a FAISS datastore keeps the arrays in ``projection.npz`` and a summary in
meta.json; a Milvus domain keeps them (base64) in its metadata property. Stores call ``apply``
in ``add`` and ``search``, so encoders, mixers and evaluation never see projected keys.
"""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnlm_vdb.errors import Incompatible, InvalidInput

log = logging.getLogger(__name__)

SAMPLE_ROWS = 32768  # keys a build fits the projection on (spread over what it stores: ingest.sample_keys)
ROTATION_SEED = 0  # of the random rotation applied after the PCA (see ``fit``)


def check_project_dim(dim_out, dim_in: int) -> None:
    """Refuse a projection dimension that is not in [1, key dimension]."""
    if dim_out is None:
        return
    if isinstance(dim_out, bool) or not isinstance(dim_out, (int, np.integer)) or not 1 <= dim_out <= dim_in:
        raise InvalidInput(f"--project-dim must be an integer in [1, {dim_in}] (the key dimension), got {dim_out!r}")


def stored_dim(meta: dict) -> int:
    """The dimension of the keys a store holds: the projection's output, else the model's key size."""
    proj = meta.get("projection") or {}
    return int(proj.get("dim_out") or meta["info"]["dim"])


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _unb64(s: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").reshape(shape).astype(np.float32)


def _distance_scale(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, queries: int = 512, pool: int = 8192,
                    k: int = 32) -> float:
    """Sum of full over projected squared distances from ``queries`` sample rows to their ``k``
    nearest (projected) neighbours among the next ``pool`` rows; 1.0 when the sample is too small."""
    nq = min(queries, len(x) // 4)
    if nq < 1 or len(x) - nq < 2:
        return 1.0
    q, p = x[:nq], x[nq:nq + pool]
    k = min(k, len(p))

    def sq(a, b):
        return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0)

    d_full = sq(q - mean, p - mean)
    d_proj = sq((q - mean) @ basis.T, (p - mean) @ basis.T)
    nn = np.argpartition(d_proj, k - 1, axis=1)[:, :k]
    proj_sum = float(np.take_along_axis(d_proj, nn, 1).sum())
    return float(np.take_along_axis(d_full, nn, 1).sum()) / proj_sum if proj_sum > 0 else 1.0


@dataclass(frozen=True)
class Projection:
    """``apply(x) = (x - mean) @ basis.T``; ``basis`` rows are orthonormal principal directions."""

    mean: np.ndarray  # [dim_in] float32
    basis: np.ndarray  # [dim_out, dim_in] float32
    sample_rows: int = 0
    explained_variance: float = 1.0  # fraction of the sample's variance the kept components hold
    distance_scale: float = 1.0  # full / projected squared distance of near neighbours (see module doc)

    @property
    def dim_in(self) -> int:
        return int(self.basis.shape[1])

    @property
    def dim_out(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def fit(cls, keys: np.ndarray, dim_out: int) -> "Projection":
        """PCA of ``keys`` (all rows given: pass the sample) to ``dim_out`` components."""
        x = np.asarray(keys, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise InvalidInput(f"fitting a projection needs at least 2 keys, got shape {x.shape}")
        check_project_dim(dim_out, x.shape[1])
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False)
        evals, evecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(evals)[::-1][:dim_out]
        total = float(np.clip(evals, 0, None).sum()) or 1.0
        kept = float(np.clip(evals[order], 0, None).sum()) / total
        # then a fixed random rotation of the kept components (as faiss's "PCAR"): distances are
        # unchanged, but PCA piles the variance into the first coordinates and PQ (a codebook per
        # group of coordinates) then spends its bits unevenly. At 408k pydocs keys pca128+pq32 was
        # +1.56% against exact without it and +0.60% / +1.69% with two rotations: the spread is
        # the λ that tune picks on 4,000 valid tokens, so the gain is not established yet
        rotation = np.linalg.qr(np.random.default_rng(ROTATION_SEED).standard_normal((dim_out, dim_out)))[0]
        basis = np.ascontiguousarray(rotation @ evecs[:, order].T, dtype=np.float32)
        mean = mean.astype(np.float32)
        scale = _distance_scale(np.asarray(keys, dtype=np.float32), mean, basis)
        log.info("fitted a %d -> %d projection on %d keys (%.1f%% of the variance kept, distance scale %.3f)",
                 x.shape[1], dim_out, len(x), 100 * kept, scale)
        return cls(mean, basis, len(x), kept, scale)

    def scale_distances(self, d: np.ndarray) -> np.ndarray:
        """Projected squared distances -> the full space's scale (``inf`` stays ``inf``)."""
        return (np.asarray(d, dtype=np.float32) * np.float32(self.distance_scale)).astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Model-space keys or queries ``[n, dim_in]`` -> stored space ``[n, dim_out]`` float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise Incompatible(f"vectors of shape {x.shape} do not fit a projection from dimension {self.dim_in}")
        return np.ascontiguousarray((x - self.mean) @ self.basis.T, dtype=np.float32)

    def summary(self) -> dict:
        """What ``describe`` shows and a FAISS meta.json records (no arrays)."""
        return {"dim_in": self.dim_in, "dim_out": self.dim_out, "sample_rows": int(self.sample_rows),
                "explained_variance": round(float(self.explained_variance), 6),
                "distance_scale": float(self.distance_scale), "kind": "pca"}

    def to_dict(self) -> dict:
        """The summary plus the arrays as base64 float32 (a Milvus domain's metadata)."""
        return {**self.summary(), "mean": _b64(self.mean), "basis": _b64(self.basis)}

    @classmethod
    def from_dict(cls, d: dict) -> "Projection":
        try:
            dim_in, dim_out = int(d["dim_in"]), int(d["dim_out"])
            return cls(_unb64(d["mean"], (dim_in,)), _unb64(d["basis"], (dim_out, dim_in)),
                       int(d.get("sample_rows", 0)), float(d.get("explained_variance", 1.0)),
                       float(d.get("distance_scale", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise Incompatible(f"the stored key projection is damaged ({type(exc).__name__}: {exc}); "
                               f"rebuild the datastore") from None

    def save(self, path: Path) -> None:
        """Write ``path`` (an .npz) atomically."""
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mean=self.mean, basis=self.basis, sample_rows=self.sample_rows,
                 explained_variance=self.explained_variance, distance_scale=self.distance_scale)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, summary: dict) -> "Projection":
        """Read ``path`` and check it against the ``summary`` recorded beside it."""
        try:
            with np.load(path) as z:
                p = cls(z["mean"].astype(np.float32), z["basis"].astype(np.float32), int(z["sample_rows"]),
                        float(z["explained_variance"]), float(z["distance_scale"]))
        except (OSError, KeyError, ValueError) as exc:
            raise Incompatible(f"cannot read the key projection {path} ({type(exc).__name__}: {exc}); "
                               f"restore it or rebuild the datastore") from None
        if (p.dim_in, p.dim_out) != (summary.get("dim_in"), summary.get("dim_out")):
            raise Incompatible(f"the key projection {path} maps {p.dim_in} -> {p.dim_out} dimensions, meta.json "
                               f"says {summary.get('dim_in')} -> {summary.get('dim_out')}; rebuild the datastore")
        return p
