"""The chart's settings agree with knnlm_vdb.settings, and values.schema.json rejects what serve
would refuse."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from knnlm_vdb.settings import DEFAULTS, KEY_TYPES, TUNED, env_name

from chart_kit import CHART, RELEASE, SETTING_ENVS, chart, configmap_data, docs_of, helm, helm_run, profile, render



# --- settings: one source of truth ---------------------------------------------------------------

def test_configmap_keys_are_exactly_the_settings(profile):
    _, docs = profile
    assert set(configmap_data(docs)) == SETTING_ENVS


def test_values_and_schema_list_exactly_the_settings():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]
    assert set(values["settings"]) == set(DEFAULTS) | set(TUNED)
    assert set(schema["properties"]) == set(DEFAULTS) | set(TUNED)
    assert set(schema["required"]) == set(DEFAULTS) - set(TUNED)
    assert all(values["settings"][n] is None for n in TUNED)  # unset: each domain's tuned settings
    assert schema["additionalProperties"] is False
    assert tuple(schema["properties"]["key_type"]["enum"]) == tuple(KEY_TYPES)


def test_chart_defaults_are_the_cli_defaults(helm, chart):
    """Values parse as the CLI parses them (settings.from_env) and equal DEFAULTS, except the
    deliberate deployment choices: the Milvus backend and its URI."""
    data = configmap_data(docs_of("default", helm, chart))
    for name, default in DEFAULTS.items():
        if name in TUNED:  # not rendered: an env var would count as a flag and override `tune`
            assert env_name(name) not in data
            continue
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
    auto = configmap_data(render(helm, chart, "--set", "settings.lambda=auto", "--set", "settings.skip_below=0.2"))
    assert (auto["KNNLM_LAMBDA"], auto["KNNLM_SKIP_BELOW"]) == ("auto", "0.2")
    assert "KNNLM_K" not in auto and "KNNLM_TEMPERATURE" not in auto


# --- values.schema.json --------------------------------------------------------------------------

@pytest.mark.parametrize("args, field", [
    (["--set", "serve.replicaCount=-1"], "serve.replicaCount"),
    (["--set", "settings.lambda=1.5"], "settings.lambda"),        # --set gives a string
    (["--set-json", "settings.lambda=1.5"], "settings.lambda"),   # a number
    (["--set-json", "settings.lambda=-0.1"], "settings.lambda"),
    (["--set", "settings.lambda=abc"], "settings.lambda"),
    (["--set", "settings.lambda=Auto"], "settings.lambda"),
    (["--set", "settings.skip_below=1"], "settings.skip_below"),
    (["--set-json", "settings.skip_below=-0.1"], "settings.skip_below"),
    (["--set", "settings.skip_below=x"], "settings.skip_below"),
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
    ["--set", "settings.lambda=auto"], ["--set", "settings.skip_below=0"], ["--set-json", "settings.skip_below=0.99"],
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


# --- the chart serves what `tune` learned ---------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated_store(tmp_path_factory, tiny_model_dirs):
    """A FAISS datastore from a tiny model, tuned with an adaptive-λ calibration (as `tune` does)."""
    from click.testing import CliRunner

    from conftest import TINY_TEXT
    from knnlm_vdb.cli import main

    tmp = tmp_path_factory.mktemp("tuned")
    (tmp / "corpus.txt").write_text(TINY_TEXT)
    common = ["--model", tiny_model_dirs["llama"], "--ctx", "64", "--stride", "32"]
    for args in (["build", *common, "--corpus", tmp / "corpus.txt", "--out", tmp / "ds"],
                 ["tune", *common, "--datastore", tmp / "ds", "--valid", tmp / "corpus.txt", "--max-k", "16"]):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    return tmp / "ds"


def _resolve_in_rendered_env(helm, chart, store_dir, monkeypatch, *set_args):
    """The serve pod's settings: its args and exactly the ConfigMap's environment through serve's own
    option parsing, then the CLI's settings resolution against the calibrated datastore."""
    from chart_kit import serve_cli
    from knnlm_vdb.cli_common import resolve_knn_settings
    from knnlm_vdb.datastore import open_store

    docs = render(helm, chart, *set_args)
    (c,) = [d for d in docs if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"]
    for var in list(os.environ):
        if var.startswith("KNNLM_"):
            monkeypatch.delenv(var)
    for var, value in configmap_data(docs).items():
        monkeypatch.setenv(var, value)
    params = serve_cli().make_context("serve", list(c["args"][1:])).params
    with open_store("faiss", str(store_dir)) as store:
        return resolve_knn_settings([store], params["k"], params["temperature"], params["lmbda"],
                                    params["skip_below"]), store.info.extra


def test_default_chart_serves_the_tuned_adaptive_settings(helm, chart, calibrated_store, monkeypatch):
    (k, temperature, lmbda, cals), extra = _resolve_in_rendered_env(helm, chart, calibrated_store, monkeypatch)
    cal, tuned = extra["calibration"], extra["tuned"]
    assert lmbda == "auto" and len(cals) == 1
    assert (k, temperature) == (cal["k"], cal["temperature"]) == (tuned["k"], tuned["temperature"])
    assert cals[0].skip_below == cal["skip_below"]  # the tuned threshold, not overridden


def test_chart_overrides_reach_the_settings_resolution(helm, chart, calibrated_store, monkeypatch):
    (k, temperature, lmbda, cals), extra = _resolve_in_rendered_env(
        helm, chart, calibrated_store, monkeypatch, "--set", "settings.lambda=auto", "--set", "settings.skip_below=0.3")
    assert lmbda == "auto" and cals[0].skip_below == 0.3 and k == extra["calibration"]["k"]
    (k, temperature, lmbda, cals), extra = _resolve_in_rendered_env(
        helm, chart, calibrated_store, monkeypatch, "--set", "settings.lambda=0.4")
    assert (k, temperature, lmbda, cals) == (extra["tuned"]["k"], extra["tuned"]["temperature"], 0.4, None)
