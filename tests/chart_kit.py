"""What the deployment tests (tests/test_chart_*.py, test_docker.py) share: the chart copy with a
stand-in Milvus dependency, helm and kubernetes-validate, the rendered profiles, small accessors.
The test files import these names, fixtures included.

Kubernetes API schemas and agrees with knnlm_vdb.settings; the Dockerfile lints.

Tools: helm and hadolint (``bash .ci/install-tools.sh`` puts them in .tools/bin) and the
kubernetes-validate package. When one is missing these tests skip, except under CI=true,
where they fail.

The chart depends on the official Milvus chart, which is not vendored and cannot be fetched
offline. Helm refuses to render a chart whose dependency is missing from charts/, even when its
condition is false, so the tests render a copy of the chart with an empty stand-in
``charts/milvus`` (a Chart.yaml, no templates): our templates are rendered in full, the Milvus
chart's are not.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from knnlm_vdb.settings import DEFAULTS, TUNED, env_name

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "knnlm-vdb"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
RELEASE = "knnlm"
NAMESPACE = "knnlm"
# what the ConfigMap holds unless the operator sets a tuned setting (k, temperature, lambda, skip_below)
SETTING_ENVS = {env_name(n) for n in DEFAULTS if n not in TUNED}
EXTERNAL_URI = yaml.safe_load((CHART / "values-external.yaml").read_text())["externalMilvus"]["uri"]

INGEST = ["--set", "ingest.enabled=true", "--set", "ingest.domain=wiki",
          "--set", "ingest.corpus.existingClaim=corpus",
          "--set-json", 'ingest.corpus.files=["wiki/part-0.jsonl","/wiki/part-1.jsonl"]',
          "--set", "ingest.schedule=0 3 * * *"]
PROFILES = {
    "default": [],
    "gpu": ["-f", str(CHART / "values-gpu.yaml"), *INGEST],
    "external": ["-f", str(CHART / "values-external.yaml")],
    "full": ["-f", str(CHART / "values-gpu.yaml"), "-f", str(CHART / "values-external.yaml"), *INGEST,
             "--set", "serve.tls.secretName=knnlm-tls", "--set", "serve.auth.tokenSecret=knnlm-clients",
             "--set", "model.existingClaim=models", "--set", "settings.model=/models/llama",
             "--set", "serve.healthPort=50053", "--set-json", 'serve.domains=["wiki","code"]'],
    # values-secure.yaml (TLS + tokens, insecure=false), mutual TLS and every limit set; the
    # large numbers come through --set-json as floats, the way values files give them to templates
    "secure": ["-f", str(CHART / "values-secure.yaml"), "--set", "serve.tls.clientCASecret=knnlm-client-ca",
               "--set-json", "serve.limits.maxTextTokens=16384", "--set-json", "serve.limits.maxK=100000",
               "--set-json", "serve.limits.maxRequestBytes=16777216", "--set", "serve.limits.maxConcurrent=12",
               "--set-json", "serve.limits.requestTimeout=2.5"],
    # client tokens over plaintext: no TLS, so the probes stay on serve.port
    "tokens": ["--set", "serve.auth.tokenSecret=knnlm-clients", "--set", "serve.insecure=false"],
}
# (TLS Secret, client CA Secret, token Secret, health port) each profile configures for serve
SERVE_SECURITY = {
    "default": (None, None, None, 50051),
    "gpu": (None, None, None, 50051),
    "external": (None, None, None, 50051),
    "full": ("knnlm-tls", None, "knnlm-clients", 50053),
    "secure": ("knnlm-vdb-tls", "knnlm-client-ca", "knnlm-vdb-tokens", 50052),
    "tokens": (None, None, "knnlm-clients", 50051),
}
# serve options that would carry a secret (or a secret's file) on the command line
SECRET_FLAGS = ("--token", "--token-file", "--write-token", "--write-token-file", "--milvus-token",
                "--milvus-token-file")


def _missing(what: str):
    msg = f"{what}: run `bash .ci/install-tools.sh` (or `make tools`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {msg}", pytrace=False)
    pytest.skip(msg)


def tool(name: str) -> str:
    local = ROOT / ".tools" / "bin" / name
    found = shutil.which(name) or (str(local) if os.access(local, os.X_OK) else None)
    if not found:
        _missing(f"{name} is not on PATH nor in .tools/bin")
    return found


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def kv():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("the kubernetes-validate package is not installed")
    return kubernetes_validate


@pytest.fixture(scope="session")
def chart(tmp_path_factory) -> Path:
    """A copy of the chart with an empty stand-in for the Milvus dependency (see module doc)."""
    dst = tmp_path_factory.mktemp("chart") / CHART.name
    shutil.copytree(CHART, dst, ignore=shutil.ignore_patterns("charts", "Chart.lock", "*.tgz"))
    dep = next(d for d in yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"] if d["name"] == "milvus")
    stub = dst / "charts" / "milvus"
    stub.mkdir(parents=True)
    (stub / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "milvus", "version": re.sub(r"^[~^>=<\s]*", "", dep["version"]),
        "description": "test stand-in for the Milvus chart: no templates"}))
    return dst


def helm_run(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, chart: Path, *args: str) -> list[dict]:
    p = helm_run(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args)
    assert p.returncode == 0, f"helm template {' '.join(args)} failed:\n{p.stderr}"
    return [d for d in yaml.safe_load_all(p.stdout) if d]


_rendered: dict[str, list[dict]] = {}


@pytest.fixture(params=list(PROFILES))
def profile(request, helm, chart) -> tuple[str, list[dict]]:
    name = request.param
    if name not in _rendered:
        _rendered[name] = render(helm, chart, *PROFILES[name])
    return name, copy.deepcopy(_rendered[name])


def docs_of(name: str, helm: str, chart: Path) -> list[dict]:
    if name not in _rendered:
        _rendered[name] = render(helm, chart, *PROFILES[name])
    return copy.deepcopy(_rendered[name])


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def configmap_data(docs: list[dict]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def min_kube_version() -> str:
    """The oldest Kubernetes the chart supports (Chart.yaml kubeVersion), as major.minor."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = re.search(r">=\s*v?(\d+)\.(\d+)", constraint)
    assert m, constraint
    return f"{m[1]}.{m[2]}"


def serve_cli():
    from knnlm_vdb.cli import main
    return main.get_command(None, "serve")


def parse_serve_args(args: list[str], monkeypatch) -> dict:
    """The rendered serve args as `knnlm-vdb serve` parses them (unknown flags or bad values raise)."""
    for var in list(os.environ):
        if var.startswith("KNNLM_"):
            monkeypatch.delenv(var)
    assert args[0] == "serve"
    return serve_cli().make_context("serve", list(args[1:])).params


def healthcheck_module():
    spec = importlib.util.spec_from_file_location("knnlm_healthcheck", DOCKERFILE.parent / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def strict_errors(kv, docs: list[dict], crds: tuple[str, ...] = ()) -> list[str]:
    """Each object checked by kubernetes-validate (strict) at the oldest supported and the newest
    Kubernetes; kinds in ``crds`` (custom resources, no schema shipped) are skipped."""
    versions = sorted({min_kube_version(), kv.utils.latest_version()})
    errors = []
    for doc in docs:
        if doc["kind"] in crds:
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {path}: {e.message}")
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {e.message}")
    return errors
