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
MAX_K = 16384  # neighbours per query, every backend: Milvus returns at most this many


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
