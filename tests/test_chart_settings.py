"""The chart's settings agree with knnlm_vdb.settings, and values.schema.json rejects what serve
would refuse."""
from __future__ import annotations

import json

import pytest
import yaml

from knnlm_vdb.settings import DEFAULTS, KEY_TYPES, env_name

from chart_kit import CHART, RELEASE, SETTING_ENVS, chart, configmap_data, docs_of, helm, helm_run, profile, render



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
