"""Which k, T and λ a run uses: one resolution for the CLI, the Python API and the service.

Order: what the caller set (a flag, an environment variable, a keyword argument) → what
``tune`` stored with the datastores → adaptive λ when every datastore has a calibration →
the defaults of ``settings.DEFAULTS``. The result is a value, ``Fixed`` or ``Adaptive``, that
``mixing.Mixer.for_settings`` turns into a search plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from knnlm_vdb.adaptive import Calibration
from knnlm_vdb.errors import Incompatible, InvalidInput
from knnlm_vdb.knn import check_params
from knnlm_vdb.settings import DEFAULTS, default_k


@dataclass(frozen=True)
class Fixed:
    """The paper's kNN-LM: one λ everywhere, all domains' top-k merged by distance."""

    k: int
    temperature: float
    lmbda: float
    adaptive = False

    def to_dict(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "lambda": self.lmbda, "adaptive": False}


@dataclass(frozen=True)
class Adaptive:
    """``--lambda auto``: λ per token and per domain from each domain's stored calibration."""

    calibrations: tuple[Calibration, ...]
    cache: Calibration | None = None  # the in-document cache's calibration, when it is mixed in
    adaptive = True
    lmbda = "auto"

    @property
    def k(self) -> int:
        return self.calibrations[0].k

    @property
    def temperature(self) -> float:
        return self.calibrations[0].temperature

    def to_dict(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "lambda": "auto", "adaptive": True,
                "skip_below": [c.skip_below for c in self.calibrations], "cache": self.cache is not None}


KnnSettings = Fixed | Adaptive


def parse_lambda(value):
    """λ is a number in [0, 1], ``"auto"`` or None (not set)."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"--lambda must be a number in [0, 1] or 'auto', got {value!r}") from None


def _label(store) -> str:
    return store.location if store is not None else "the datastore"


def cache_calibration(stores, cache: bool | None) -> Calibration | None:
    """The in-document cache's calibration (``tune`` stores one with each datastore; the first one
    found serves): on by default where there is one, off with ``cache=False``, required with ``True``."""
    if cache is False:
        return None
    for s in stores:
        if "cache_calibration" in s.info.extra:
            return Calibration.from_dict(s.info.extra["cache_calibration"])
    if cache:
        raise Incompatible("--cache needs the in-document cache's calibration, and no datastore has one: "
                           "run `knnlm-vdb tune` on validation text first")
    return None


def resolve(stores, k: int | None = None, temperature: float | None = None, lmbda=None,
            skip_below: float | None = None, cache: bool | None = None) -> KnnSettings:
    """The settings for searching ``stores`` (see the module doc for the order). ``cache``: mix in
    the in-document cache (adaptive λ only; None = wherever ``tune`` calibrated it)."""
    lmbda = parse_lambda(lmbda)
    if temperature is not None and not math.isfinite(temperature):
        raise InvalidInput(f"--temperature must be a finite positive number, got {temperature}")
    calibrated = [("calibration" in s.info.extra) for s in stores]
    if lmbda == "auto" or (lmbda is None and k is None and temperature is None and calibrated and all(calibrated)):
        if not all(calibrated):
            bare = stores[calibrated.index(False)] if stores else None
            raise Incompatible(f"--lambda auto needs a calibration for every datastore, and {_label(bare)} has "
                               "none: run `knnlm-vdb tune` on validation text first")
        cals = [Calibration.from_dict(s.info.extra["calibration"]) for s in stores]
        if skip_below is not None:
            if not 0.0 <= skip_below < 1.0:
                raise InvalidInput(f"--skip-below must be in [0, 1), got {skip_below}")
            for c in cals:
                c.skip_below = skip_below
        return Adaptive(tuple(cals), cache_calibration(stores, cache))
    if cache:
        raise InvalidInput("--cache is mixed in by adaptive λ: use it with --lambda auto (after `knnlm-vdb tune`)")
    if skip_below is not None:
        raise InvalidInput("--skip-below applies to adaptive λ: use it with --lambda auto (after `knnlm-vdb tune`)")
    tuned = stores[0].info.extra.get("tuned", {}) if stores else {}
    # untuned: k by backend (smaller on Milvus Lite, whose search cost grows with k)
    k = k if k is not None else int(tuned.get("k", default_k(getattr(stores[0], "deployment", None)
                                                           if stores else None)))
    temperature = temperature if temperature is not None else float(tuned.get("temperature", DEFAULTS["temperature"]))
    lmbda = lmbda if lmbda is not None else float(tuned.get("lambda", DEFAULTS["lambda"]))
    check_params(lmbda=lmbda, k=k, temperature=temperature)
    return Fixed(int(k), float(temperature), float(lmbda))
