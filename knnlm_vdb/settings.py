"""One set of names for every knob.

The same name is a CLI flag (``--lambda``), an environment variable (``KNNLM_LAMBDA``),
a key in the Helm ConfigMap and a field the service reads, so deployments cannot drift
from the CLI.
"""
from __future__ import annotations

import os

ENV_PREFIX = "KNNLM_"

# name -> default. Kept in one dict so the Helm chart test can check its ConfigMap against it.
DEFAULTS: dict[str, object] = {
    "model": "smollm2-135m",
    "key_type": "ffn_input",
    "ctx": 1024,
    "stride": 512,
    "batch_size": 2,
    "dtype": "auto",
    "device": "auto",
    "key_dtype": "float16",
    "k": 1024,
    "temperature": 1.0,
    "lambda": 0.25,
    "backend": "faiss",
    "uri": "./knnlm.db",
    "index": "flat",
    "nprobe": 32,
    "consistency": "Strong",
}

KEY_TYPES = ("ffn_input", "final_hidden")
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")  # Milvus read consistency (--consistency)
MAX_K = 16384  # neighbours per query, every backend: Milvus returns at most this many

# Settings whose real default is what `tune` stored with the datastore (adaptive λ when it fitted
# a calibration); DEFAULTS only applies to an untuned datastore. A deployment leaves them unset
# (the Helm chart renders them only when the operator sets one). skip_below has no DEFAULTS
# entry: it only narrows a calibration.
TUNED = ("k", "temperature", "lambda", "skip_below")

# k for an untuned datastore, by where it lives: Milvus Lite searches brute force on the CPU and
# k=1024 there makes a few thousand tokens take minutes (see README "Defaults that fit together").
DEFAULT_K_BY_DEPLOYMENT = {"lite": 128}
# The index of a new domain when --index is not given, by where it lives: Milvus Lite brute-forces
# FLAT (~120 ms a query at 26k entries on a loaded 2-core machine), HNSW answers in ~7 ms.
DEFAULT_INDEX_BY_DEPLOYMENT = {"lite": "HNSW"}

# serve's cap on a request's deadline and score's client deadline: one setting, one variable.
REQUEST_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_ENV = "KNNLM_REQUEST_TIMEOUT"


def default_k(deployment: str | None = None) -> int:
    """k for an untuned datastore on ``deployment`` (``lite``, ``server``; None: FAISS)."""
    return DEFAULT_K_BY_DEPLOYMENT.get(deployment, DEFAULTS["k"])


def env_name(name: str) -> str:
    """``lambda`` -> ``KNNLM_LAMBDA``."""
    return ENV_PREFIX + name.upper()


def from_env(name: str):
    """The value of a setting from the environment, else its default (typed like the default)."""
    default = DEFAULTS[name]
    raw = os.environ.get(env_name(name))
    if raw is None:
        return default
    return type(default)(raw)
