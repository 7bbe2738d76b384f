"""From LM outputs and neighbours to kNN-LM log-probabilities: the one place λ is applied.

``evaluate()`` and the gRPC service both score through a ``Mixer``, so a text scores the same
offline and online. Two modes:

* **fixed λ** (the paper's kNN-LM): all domains' top-k are merged by distance into one p_kNN
  and mixed with the LM with one λ;
* **adaptive** (``--lambda auto``, one ``adaptive.Calibration`` per domain): each domain is
  searched only where its pre-search gate expects help, gets its own per-token λ from its own
  retrieval evidence and its own per-document trust (``adaptive.DocumentTrust``), and the
  domains' p_kNN are mixed with the LM by ``adaptive.mix_domains``: a domain whose neighbours
  do not help this document fades out by itself instead of diluting one that does. The
  in-document cache (``doc_cache.DocumentCache``), when calibrated, is one more part of that
  mixture, after the domains, with its own calibration and trust.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from knnlm_vdb.adaptive import LAMBDA_CAP, Calibration, DocumentTrust, mix_domains
from knnlm_vdb.datastore.base import merge_topk
from knnlm_vdb.doc_cache import DocumentCache
from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.knn import check_params, interpolate, knn_distribution, knn_target_logprobs


@dataclass
class Found:
    """One search group's neighbours for a run of queries (inf / -1 where it was not searched)."""

    searched: np.ndarray  # bool [n]
    distances: np.ndarray  # float32 [n, k]
    values: np.ndarray  # int32 [n, k]

    @classmethod
    def place(cls, searched: np.ndarray, k: int, distances=None, values=None) -> "Found":
        """The neighbours of the searched queries (rows in order) at their places among all ``n``."""
        dist = np.full((len(searched), k), np.inf, np.float32)
        vals = np.full((len(searched), k), -1, np.int32)
        if distances is not None:
            dist[searched], vals[searched] = distances, values
        return cls(searched, dist, vals)


class Mixer:
    """Search plan and λ for a set of stores. ``groups[g]`` are searched together (merged top-k).

    The mixture's parts are the groups, then (adaptive, with a ``cache`` calibration) the
    in-document cache: ``calibrations``, ``ks``, ``temperatures``, masks, ``Found`` lists and
    trust lists all run over the parts in that order."""

    @classmethod
    def for_settings(cls, stores, settings) -> "Mixer":
        """The plan for resolved ``knn_settings`` (``Fixed`` or ``Adaptive``)."""
        if settings.adaptive:
            return cls(stores, calibrations=list(settings.calibrations), cache=settings.cache)
        return cls(stores, settings.k, settings.temperature, settings.lmbda)

    def __init__(self, stores, k: int | None = None, temperature: float | None = None, lmbda: float | None = None,
                 calibrations: list[Calibration] | None = None, cache: Calibration | None = None):
        self.stores = list(stores)
        self.calibrations = list(calibrations) if calibrations is not None else None
        self.cache = cache
        if cache is not None and self.calibrations is None:
            raise KnnlmError("the in-document cache is mixed by adaptive λ: it needs calibrations")
        if self.calibrations is not None:
            if len(self.calibrations) != len(self.stores):
                raise KnnlmError(f"adaptive λ needs one calibration per domain: {len(self.calibrations)} "
                                 f"for {len(self.stores)} domain(s)")
            self.groups = [[s] for s in self.stores]
            if cache is not None:
                self.calibrations.append(cache)
            for c in self.calibrations:
                check_params(k=c.k, temperature=c.temperature)
            self.ks = [c.k for c in self.calibrations]
            self.temperatures = [c.temperature for c in self.calibrations]
            self.lmbda = None
        else:
            check_params(lmbda=lmbda, k=k, temperature=temperature)
            self.groups = [self.stores] if self.stores else []
            self.ks, self.temperatures, self.lmbda = [k], [temperature], lmbda

    @property
    def adaptive(self) -> bool:
        return self.calibrations is not None

    def search_masks(self, lm_entropy, lm_max_logprob) -> list[np.ndarray]:
        """Per group: which queries to search (all of them under a fixed λ)."""
        if not self.adaptive:
            return [np.ones(len(lm_entropy), bool) for _ in self.groups]
        return [c.search_mask(lm_entropy, lm_max_logprob) for c in self.calibrations]

    def search(self, g: int, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.ks[g]
        return merge_topk([s.search(queries, k) for s in self.groups[g]], k)

    def retrieve(self, keys: np.ndarray, masks: list[np.ndarray], cache=None, targets=None,
                 searched=None) -> list[Found]:
        """Each part's neighbours of ``keys`` where its mask says so (see ``search_cache`` for ``cache``).
        ``searched``: each group's (distances, values) for all of ``keys``, when the search already ran."""
        if searched is None:
            found = [Found.place(mask, self.ks[g], *(self.search(g, keys[mask]) if mask.any() else ()))
                     for g, mask in enumerate(masks[:len(self.groups)])]
        else:
            found = [Found.place(mask, self.ks[g], d[mask], v[mask])
                     for g, (mask, (d, v)) in enumerate(zip(masks, searched))]
        if self.cache is not None:
            found.append(self.search_cache(cache, keys, masks[len(self.groups)], targets))
        return found

    def searched(self, found: list[Found]) -> np.ndarray:
        """Which queries any datastore group searched (the cache part is not a datastore search)."""
        return np.any([f.searched for f in found[:len(self.groups)]], axis=0)

    def new_cache(self) -> DocumentCache | None:
        """An empty in-document cache for a new document (None when this plan has none)."""
        return DocumentCache() if self.cache is not None else None

    def search_cache(self, cache, keys: np.ndarray, mask: np.ndarray, targets=None) -> Found:
        """The cache part's neighbours. ``cache``: the document's ``DocumentCache`` — with ``targets``
        the keys are its next positions, searched causally and then added — or one cache per query
        row (generation: each row searches its own prompt's positions), or None (nothing found)."""
        k = self.cache.k
        if cache is None or not mask.any():
            found = Found.place(np.zeros(len(keys), bool), k)
        elif isinstance(cache, (list, tuple)):
            hits = [cache[i].search(keys[i:i + 1], k) for i in np.flatnonzero(mask)]
            found = Found.place(mask, k, *(np.concatenate(p) for p in zip(*hits)))
        elif targets is not None:
            found = Found.place(mask, k, *cache.search(keys[mask], k, keys, targets, np.flatnonzero(mask)))
        else:
            found = Found.place(mask, k, *cache.search(keys[mask], k))
        if targets is not None and cache is not None and not isinstance(cache, (list, tuple)):
            cache.add(keys, targets)
        return found

    def new_document(self) -> list[DocumentTrust] | None:
        return [c.new_document() for c in self.calibrations] if self.adaptive else None

    def score(self, trust, targets, lm_logprobs, lm_entropy, lm_max_logprob, found: list[Found]):
        """-> (log p_kNN-LM of each target, total λ per target, log p_kNN of the first group).
        ``trust`` (from ``new_document``) learns from these targets: pass a document's runs in order."""
        lm = np.asarray(lm_logprobs, np.float64)
        if not found:
            return lm, np.zeros(len(lm)), np.full(len(lm), -np.inf)
        knns = [knn_target_logprobs(f.distances, f.values, targets, t) for f, t in zip(found, self.temperatures)]
        if not self.adaptive:
            lam = np.full(len(lm), self.lmbda, np.float64)
            return interpolate(lm, knns[0], lam), lam, knns[0]
        parts = []
        for f, knn, cal, doc in zip(found, knns, self.calibrations, trust):
            gate = cal.lambdas(f.distances, lm_entropy, lm_max_logprob, f.searched)
            parts.append((knn, doc.observe(lm, knn, gate)))
        parts = self._cache_yields(parts)
        return mix_domains(lm, parts), np.sum([lam for _, lam in parts], axis=0), _knn_part(parts)

    def _cache_yields(self, parts):
        """The cache takes only the weight the domains leave under the cap. Each part's gate and
        trust were fitted against the LM alone; where a domain is confident (a memorised passage)
        a cache added on top would, once the cap scales every part down, dilute the better part."""
        if self.cache is None or len(parts) < 2:
            return parts
        room = np.maximum(0.0, LAMBDA_CAP - np.sum([np.asarray(lam, np.float64) for _, lam in parts[:-1]], axis=0))
        knn, lam = parts[-1]
        return parts[:-1] + [(knn, np.minimum(lam, room))]

    def next_token(self, trust, lm_logprobs, lm_entropy, lm_max_logprob, found: list[Found]):
        """-> (log p over the vocabulary, total λ, log p_kNN of the first group) for one query.
        With no document read yet, each domain's trust is its prior mean."""
        scales = [[doc.expected_scale() for doc in trust]] if self.adaptive else None
        mixed, lam, knn = self.distributions(scales, np.asarray(lm_logprobs)[None], lm_entropy, lm_max_logprob, found)
        return mixed[0], float(lam[0]), knn[0]

    def distributions(self, scales, lm_logprobs, lm_entropy, lm_max_logprob, found: list[Found]):
        """Next-token distributions for ``B`` queries: -> (log p ``[B, V]``, total λ ``[B]``,
        log p_kNN of the first group ``[B, V]``). ``scales[b][g]`` is how far query b trusts
        domain g (``DocumentTrust.expected_scale`` of its document; adaptive only)."""
        lm = np.asarray(lm_logprobs, np.float64)
        n, vocab = lm.shape
        if not found:
            return lm, np.zeros(n), np.full(lm.shape, -np.inf)
        knns = [np.stack([knn_distribution(f.distances[b], f.values[b], vocab, t) for b in range(n)])
                for f, t in zip(found, self.temperatures)]
        if not self.adaptive:
            lam = np.full(n, float(self.lmbda))
            return interpolate(lm, knns[0], self.lmbda), lam, knns[0]
        parts = []
        for g, (f, knn, cal) in enumerate(zip(found, knns, self.calibrations)):
            gate = cal.lambdas(f.distances, lm_entropy, lm_max_logprob, f.searched)
            lam = np.minimum(gate * np.array([s[g] for s in scales]), LAMBDA_CAP)
            parts.append((knn, lam))
        parts = [(knn, np.broadcast_to(lam[:, None], lm.shape)) for knn, lam in self._cache_yields(parts)]
        return mix_domains(lm, parts), np.sum([lam[:, 0] for _, lam in parts], axis=0), _knn_part(parts)


def _knn_part(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The retrieval side of a multi-domain mixture, log Σ_d (λ_d / Σλ) p_kNN_d (equal weights
    where every λ is 0): what a response reports as p_kNN."""
    if len(parts) == 1:
        return np.asarray(parts[0][0], np.float64)
    lams = np.stack([np.asarray(lam, np.float64) for _, lam in parts])
    total = lams.sum(0)
    weights = np.where(total > 0, lams / np.where(total > 0, total, 1.0), 1.0 / len(parts))
    with np.errstate(divide="ignore"):
        terms = np.log(weights) + np.stack([np.asarray(knn, np.float64) for knn, _ in parts])
    m = terms.max(0)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(terms - m).sum(0))
