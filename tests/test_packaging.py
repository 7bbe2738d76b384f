"""What `pip install` gets: the built wheel's metadata (one FAISS per extra, true minimums, no
unused dependencies, the license), and a client that imports without torch."""
from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAISS = {"faiss-cpu", "faiss-gpu-cu12"}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):  # a copy: the build leaves build/ and egg-info
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "knnlm_vdb", src / "knnlm_vdb", ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = out.glob("knnlm_vdb-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    return meta, names


def _requires(meta) -> dict[str | None, dict[str, str]]:
    """extra (None: always) -> {distribution: specifier}."""
    by_extra: dict[str | None, dict[str, str]] = {}
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*\(?([^)]*)\)?", spec)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        by_extra.setdefault(extra[1] if extra else None, {})[m[1].lower() + (m[2] or "")] = m[3].strip()
    return by_extra


def _closure(reqs, extra) -> set[str]:
    """Distributions an install of ``knnlm-vdb[extra]`` pulls (the extra's self-references followed)."""
    names, todo, seen = set(reqs[None]), [extra] if extra else [], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for name in reqs.get(e, {}):
            m = re.match(r"knnlm-vdb\[(.+)\]", name)
            if m:
                todo += m[1].split(",")
            else:
                names.add(name)
    return names


def test_one_faiss_per_install(metadata):
    reqs = _requires(metadata[0])
    assert _closure(reqs, "cpu") & FAISS == {"faiss-cpu"}
    assert _closure(reqs, "gpu") & FAISS == {"faiss-gpu-cu12"}
    for extra in (None, "client", "runtime", "dev", "bench"):
        assert not _closure(reqs, extra) & FAISS, extra
    assert "torch" in _closure(reqs, "cpu") and "torch" in _closure(reqs, "gpu")


def test_client_install_has_no_torch(metadata):
    reqs = _requires(metadata[0])
    assert "client" in reqs or "client" in metadata[0].get_all("Provides-Extra")
    client = _closure(reqs, "client")
    assert not client & {"torch", "transformers", "pymilvus", "milvus-lite", "gguf"}
    assert {"grpcio", "protobuf", "grpcio-health-checking", "click", "numpy"} <= client


def test_true_minimums_and_no_unused_dependency(metadata):
    reqs = _requires(metadata[0])
    runtime = reqs["runtime"]
    assert runtime["transformers"] == ">=4.56"  # from_pretrained(dtype=...) (lm.py)
    assert runtime["torch"] == ">=2.2"  # no cap: the Makefile picks the CPU wheel
    # never imported here, but transformers >= 5.24 refuses to load a GGUF file (the default model) without it
    assert runtime["accelerate"] == ">=1.0" and "accelerate" not in _closure(reqs, "client")
    imported = "\n".join(p.read_text() for p in (ROOT / "knnlm_vdb").rglob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+accelerate\b", imported, re.M)


def test_license_is_shipped(metadata):
    meta, names = metadata
    assert meta.get("License-Expression") == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")


def test_client_imports_without_torch():
    code = ("import sys; import knnlm_vdb.service.client as c; c.KnnlmClient; import knnlm_vdb.cli; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'faiss', 'pymilvus', 'gguf') if m in sys.modules); "
            "print(heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
