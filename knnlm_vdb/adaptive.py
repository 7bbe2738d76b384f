"""Adaptive interpolation: λ per token from retrieval evidence, and skipping useless searches.

A fixed λ trusts the datastore equally everywhere. Out of domain its neighbours are far away
and wrong, and a fixed λ then makes the kNN-LM worse than its base LM. Here λ is a small
logistic gate over features that say how much to trust this retrieval
(cf. Drozdov et al. 2022, He et al. 2021):

    λ(x) = λ_max · sigmoid(w · standardise(f(x)) + b)
    f(x) = [log(1+d_1), log(1+d_8), log(1+d_k), H(p_LM), max log p_LM]

fitted on validation text by maximising the kNN-LM log-likelihood. Because distances are
features, neighbours that are far away (another domain) get λ → 0 by themselves.

A second gate sees only the LM's own features (entropy, max probability), which exist
*before* the search: where it predicts a λ below ``skip_below``, the search is skipped and
the token is scored by the LM alone — the speed-up of adaptive retrieval.

Per-token features cannot tell a foreign domain from a hard passage of the home domain: at the
same neighbour distance, retrieval from another domain simply helps less (measured: the best λ
at pydocs-like distances is ~0.1 in domain and ~0.01 across). What does tell them apart is the
document read so far. ``DocumentTrust`` keeps, per document and per domain, a Bayesian posterior
over a few multiples s of the gate's λ (s = 0 is the base LM alone), updated after every
scored token with that token's likelihood under each multiple (fixed-share, so the posterior
can follow a document that changes topic). The posterior mean of s·λ_gate is the λ used, so
the result is still a kNN-LM, and its log-loss over a document is at most the best multiple's
plus log(#multiples) plus the switching cost: it cannot do much worse than the LM alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from knnlm_vdb.knn import interpolate, knn_target_logprobs, perplexity

POST_FEATURES = ("log_d1", "log_d8", "log_dk", "lm_entropy", "lm_max_logprob")
PRE_FEATURES = ("lm_entropy", "lm_max_logprob")
_FAR = 1e6  # stands in for a missing neighbour's distance
TRUST_SCALES = (0.0, 0.5, 1.0, 1.5)  # multiples of the gate's λ that DocumentTrust weighs
SWITCH_RATE = 1e-3  # fixed-share: prior mass given back to every multiple after each token
LAMBDA_CAP = 0.95


def _features(distances: np.ndarray | None, lm_entropy: np.ndarray, lm_max_logprob: np.ndarray,
              names: tuple[str, ...]) -> np.ndarray:
    cols = []
    for name in names:
        if name.startswith("log_d"):
            d = np.where(np.isfinite(distances), distances, _FAR)
            j = {"log_d1": 0, "log_d8": min(7, d.shape[1] - 1), "log_dk": d.shape[1] - 1}[name]
            cols.append(np.log1p(np.maximum(d[:, j], 0.0)))
        elif name == "lm_entropy":
            cols.append(lm_entropy)
        elif name == "lm_max_logprob":
            cols.append(lm_max_logprob)
    return np.stack(cols, axis=1).astype(np.float64)


@dataclass
class LinearGate:
    names: tuple[str, ...]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    lambda_max: float

    def __call__(self, distances, lm_entropy, lm_max_logprob) -> np.ndarray:
        z = (_features(distances, lm_entropy, lm_max_logprob, self.names) - np.array(self.mean)) / np.array(self.std)
        return self.lambda_max * 0.5 * (1.0 + np.tanh(0.5 * (z @ np.array(self.weights) + self.bias)))  # sigmoid


def _fit_gate(names, distances, lm_entropy, lm_max_logprob, lm_logprobs, knn_logprobs, lambda_max=0.9,
              l2=1e-3, steps=200) -> LinearGate:
    """Maximise mean log((1-λ)p_LM + λ p_kNN) over the gate's parameters (L-BFGS, small L2)."""
    import torch

    x = _features(distances, lm_entropy, lm_max_logprob, names)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = torch.tensor((x - mean) / std)
    lm = torch.tensor(np.asarray(lm_logprobs, np.float64))
    knn = torch.tensor(np.maximum(np.asarray(knn_logprobs, np.float64), -1e4))  # -inf -> very unlikely
    # λ may only fall as neighbours get farther: the gate then extrapolates safely to other
    # domains, whose neighbours are all farther than anything seen while fitting.
    monotone = torch.tensor([n.startswith("log_d") for n in names])
    u = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, b], max_iter=steps, line_search_fn="strong_wolfe")

    def weights():
        return torch.where(monotone, -torch.nn.functional.softplus(u), u)

    def loss():
        opt.zero_grad()
        w = weights()
        lam = lambda_max * torch.sigmoid(z @ w + b)
        ll = torch.logaddexp(torch.log1p(-lam) + lm, torch.log(lam) + knn)
        value = -ll.mean() + l2 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    return LinearGate(tuple(names), mean.tolist(), std.tolist(), weights().detach().tolist(), float(b.detach()),
                      lambda_max)


class DocumentTrust:
    """How far to trust one domain's gate on the document being read (see the module doc)."""

    def __init__(self, scales=TRUST_SCALES, switch_rate: float = SWITCH_RATE):
        self.scales = np.asarray(scales, np.float64)
        self.prior = np.full(len(self.scales), 1.0 / len(self.scales))
        self.weights = self.prior.copy()
        self.switch_rate = switch_rate

    def expected_scale(self) -> float:
        return float(self.weights @ self.scales)

    def observe(self, lm_logprobs, knn_logprobs, gate_lambdas) -> np.ndarray:
        """λ for each token in order — from the evidence before it — then learn from its target."""
        lm = np.asarray(lm_logprobs, np.float64)
        knn = np.asarray(knn_logprobs, np.float64)
        gate = np.asarray(gate_lambdas, np.float64)
        # p_kNN/p_LM of each target, clipped so the products below stay finite
        ratio = np.exp(np.clip(np.where(np.isfinite(knn), knn - lm, -np.inf), -700.0, 300.0))
        out = np.zeros(len(gate))
        w, scales, prior, share = self.weights, self.scales, self.prior, self.switch_rate
        for t in np.flatnonzero(gate > 0):  # λ = 0: every multiple predicts alike, nothing to learn
            lam = np.minimum(scales * gate[t], LAMBDA_CAP)
            out[t] = w @ lam
            w = w * ((1.0 - lam) + lam * ratio[t])  # each multiple's p(target) / p_LM(target)
            w = (1.0 - share) * w / w.sum() + share * prior
        self.weights = w
        return out


@dataclass
class Calibration:
    """What ``--lambda auto`` needs; stored with the datastore as ``extra["calibration"]``."""

    k: int
    temperature: float
    post: LinearGate
    pre: LinearGate
    skip_below: float  # skip the search where the pre-search gate predicts λ below this
    trust_scales: tuple = TRUST_SCALES
    switch_rate: float = SWITCH_RATE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        gate = lambda g: LinearGate(tuple(g["names"]), g["mean"], g["std"], g["weights"], g["bias"], g["lambda_max"])  # noqa: E731
        return cls(int(d["k"]), float(d["temperature"]), gate(d["post"]), gate(d["pre"]), float(d["skip_below"]),
                   tuple(d.get("trust_scales", TRUST_SCALES)), float(d.get("switch_rate", SWITCH_RATE)))

    def new_document(self) -> DocumentTrust:
        return DocumentTrust(self.trust_scales, self.switch_rate)

    def search_mask(self, lm_entropy, lm_max_logprob) -> np.ndarray:
        return self.pre(None, lm_entropy, lm_max_logprob) >= self.skip_below

    def lambdas(self, distances, lm_entropy, lm_max_logprob, searched) -> np.ndarray:
        return np.where(searched, self.post(distances, lm_entropy, lm_max_logprob), 0.0)


def fit_calibration(neighbours, k: int, temperature: float, max_ppl_cost: float = 0.005) -> tuple[Calibration, dict]:
    """Fit both gates on validation neighbours; pick the largest skip threshold whose
    perplexity cost (vs. searching everywhere) stays within ``max_ppl_cost``."""
    nb = neighbours
    dist = nb.distances[:, :k]
    knn = knn_target_logprobs(dist, nb.values[:, :k], nb.targets, temperature)
    post = _fit_gate(POST_FEATURES, dist, nb.lm_entropy, nb.lm_max_logprob, nb.lm_logprobs, knn)
    pre = _fit_gate(PRE_FEATURES, None, nb.lm_entropy, nb.lm_max_logprob, nb.lm_logprobs, knn)
    cal = Calibration(k, temperature, post, pre, 0.0)
    lam_post = post(dist, nb.lm_entropy, nb.lm_max_logprob)
    lam_pre = pre(None, nb.lm_entropy, nb.lm_max_logprob)

    def auto_ppl(searched):  # the validation text read as one document
        lam = cal.new_document().observe(nb.lm_logprobs, knn, np.where(searched, lam_post, 0.0))
        return perplexity(interpolate(nb.lm_logprobs, knn, lam))

    full = auto_ppl(np.ones(len(lam_pre), bool))
    curve = []
    for tau in np.unique(np.quantile(lam_pre, np.linspace(0, 0.95, 39))):
        searched = lam_pre >= tau
        ppl = auto_ppl(searched)
        curve.append({"skip_below": float(tau), "skipped": float(1 - searched.mean()), "ppl": ppl})
        if ppl <= full * (1 + max_ppl_cost):
            cal.skip_below = max(cal.skip_below, float(tau))
    report = {"valid_base_ppl": perplexity(nb.lm_logprobs), "valid_auto_ppl": full,
              "valid_skipped": float(1 - cal.search_mask(nb.lm_entropy, nb.lm_max_logprob).mean()),
              "skip_curve": curve}
    return cal, report


def mix_domains(lm_logprobs: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], max_total: float = 0.95) -> np.ndarray:
    """Mix the LM with several domains' p_kNN, each with its own per-token λ.

    ``parts`` holds (log p_kNN of the target, λ) per domain. Each domain's weight comes from
    its own retrieval evidence, so a domain whose neighbours are far away fades out by itself
    instead of diluting a domain that matches. Weights summing over ``max_total`` are scaled down.
    """
    lams = np.stack([np.asarray(lam, np.float64) for _, lam in parts])
    total = lams.sum(0)
    scale = np.where(total > max_total, max_total / np.maximum(total, 1e-12), 1.0)
    lams = lams * scale
    with np.errstate(divide="ignore"):
        terms = [np.log1p(-lams.sum(0)) + np.asarray(lm_logprobs, np.float64)]
        terms += [np.log(lam) + np.asarray(knn, np.float64) for (knn, _), lam in zip(parts, lams)]
    stacked = np.stack(terms)
    m = np.max(stacked, 0)
    m = np.where(np.isfinite(m), m, 0.0)  # a token every part rules out (-inf everywhere) stays -inf
    with np.errstate(divide="ignore"):
        return m + np.log(np.sum(np.exp(stacked - m), 0))
