"""The chart's operational objects: ServiceAccount without a token, PodDisruptionBudget, optional
HPA, the NetworkPolicy that guards a plaintext serve, the headless Service, Prometheus metrics
(port, annotations, ServiceMonitor) and the `helm test` pod that calls health and one Score."""
from __future__ import annotations

import pytest

from chart_kit import (PROFILES, RELEASE, SERVE_SECURITY, chart, docs_of, env_of, helm, helm_run, kv, one,
                       parse_serve_args, pod_spec, profile, render, strict_errors)

# everything optional switched on
OPS = ["--set", "serve.metrics.enabled=true", "--set", "serve.metrics.serviceMonitor.enabled=true",
       "--set", "serve.metrics.serviceMonitor.labels.release=prom", "--set", "serve.autoscaling.enabled=true",
       "--set-json", 'serve.autoscaling.metrics=[{"type":"Pods","pods":{"metric":{"name":"knnlm_requests_in_flight"},'
       '"target":{"type":"AverageValue","averageValue":"4"}}}]', "--set", "serve.service.headless=true"]
FULL = f"{RELEASE}-knnlm-vdb"


@pytest.fixture(scope="module")
def ops(helm, chart):
    return render(helm, chart, *OPS)


def _named(docs, kind, name):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_ops_objects_validate_strict(ops, kv):
    assert not strict_errors(kv, ops, crds=("ServiceMonitor",))
    sm = one(ops, "ServiceMonitor")  # a CRD: checked by hand
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                        "scrapeTimeout": "10s"}]
    assert sm["spec"]["selector"]["matchLabels"] == one(ops, "Deployment")["spec"]["selector"]["matchLabels"]


def test_service_account_mounts_no_token(profile):
    _, docs = profile
    sa = one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "CronJob", "Pod"):
            spec = d["spec"] if d["kind"] == "Pod" else pod_spec(d)
            assert spec["automountServiceAccountToken"] is False, d["metadata"]["name"]
            # the migrate hook runs before the release's ServiceAccount exists
            want = None if d["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate" else sa["metadata"]["name"]
            assert spec.get("serviceAccountName") == want, d["metadata"]["name"]


def test_pdb_covers_the_serve_pods(profile):
    _, docs = profile
    pdb, dep = one(docs, "PodDisruptionBudget"), one(docs, "Deployment")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"] and pdb["spec"]["maxUnavailable"] == 1


def test_hpa_replaces_replica_count(ops, helm, chart):
    hpa, dep = one(ops, "HorizontalPodAutoscaler"), one(ops, "Deployment")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULL}
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    p = helm_run(helm, "template", RELEASE, str(chart), "--set", "serve.autoscaling.enabled=true",
                 "--set", "serve.autoscaling.targetCPUUtilizationPercentage=null")
    assert p.returncode != 0 and "targetCPUUtilizationPercentage and/or metrics" in p.stderr


def test_network_policy_guards_a_plaintext_serve(profile):
    name, docs = profile
    open_serve = SERVE_SECURITY[name][:3] == (None, None, None)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert bool(policies) is open_serve
    if not policies:
        return
    (np,) = policies
    dep = one(docs, "Deployment")
    assert np["spec"]["podSelector"] == dep["spec"]["selector"] and np["spec"]["policyTypes"] == ["Ingress"]
    (grpc_rule,) = np["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {f"{FULL}-client": "true"}}}]
    # the helm test pod is such a client
    assert one(docs, "Pod", "test")["metadata"]["labels"][f"{FULL}-client"] == "true"


def test_network_policy_can_be_forced(helm, chart):
    docs = render(helm, chart, *PROFILES["secure"], "--set", "networkPolicy.enabled=true",
                  "--set", "serve.metrics.enabled=true")
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert [r["ports"][0]["port"] for r in rules] == ["grpc", "health", "metrics"]
    assert "from" not in rules[2]  # metrics: from anywhere unless networkPolicy.metricsFrom
    assert not [d for d in render(helm, chart, "--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]


def test_headless_service_for_client_side_balancing(ops):
    svc, headless = _named(ops, "Service", FULL), _named(ops, "Service", f"{FULL}-headless")
    assert headless["spec"]["clusterIP"] == "None" and svc["spec"].get("clusterIP") is None
    assert headless["spec"]["selector"] == svc["spec"]["selector"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


def test_metrics_port_args_and_scrape_annotations(ops, monkeypatch):
    dep = one(ops, "Deployment")
    (c,) = pod_spec(dep)["containers"]
    assert parse_serve_args(c["args"], monkeypatch)["metrics_port"] == 9090
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == ("true", "9090",
                                                                                                  "/metrics")
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in \
        _named(ops, "Service", FULL)["spec"]["ports"]


def test_metrics_off_by_default(profile, monkeypatch):
    _, docs = profile
    (c,) = pod_spec(one(docs, "Deployment"))["containers"]
    assert parse_serve_args(c["args"], monkeypatch)["metrics_port"] is None
    assert "prometheus.io/scrape" not in one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("args, field", [
    (["--set", "serve.metrics.port=0"], "serve.metrics.port"),
    (["--set", "serve.autoscaling.minReplicas=0"], "serve.autoscaling.minReplicas"),
    (["--set", "serve.podDisruptionBudget.maxUnavailable=x"], "serve.podDisruptionBudget.maxUnavailable"),
    (["--set", "networkPolicy.enabled=maybe"], "networkPolicy.enabled"),
    (["--set", "serviceAccount.automount=true"], "serviceAccount"),
])
def test_schema_rejects_ops_values(helm, chart, args, field):
    p = helm_run(helm, "template", RELEASE, str(chart), *args)
    assert p.returncode != 0 and f"- {field}" in p.stderr, p.stderr


@pytest.mark.parametrize("profile_name", ["default", "tokens", "secure"])
def test_helm_test_pod_calls_health_and_score(helm, chart, profile_name):
    docs = docs_of(profile_name, helm, chart)
    pod = one(docs, "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    script = c["command"][2]
    assert "HealthStub" in script and "c.score(" in script
    compile(script, "test-score", "exec")  # the script the pod runs is valid Python
    env = {k: e.get("value") for k, e in env_of(c).items()}
    svc = one(docs, "Service", "serve")
    assert env["TARGET"] == f"{FULL}.knnlm.svc:{svc['spec']['ports'][0]['port']}"
    tls, _, tokens, _ = SERVE_SECURITY[profile_name]
    assert ("SERVER_NAME" in env) is bool(tls) and ("TOKEN_FILE" in env) is bool(tokens)
    vols = {v["name"]: v["secret"] for v in pod["spec"]["volumes"] if "secret" in v}
    if tls:
        assert vols["tls"]["secretName"] == tls and vols["tls"]["optional"] is True
    if tokens:  # only the read token, never the write token
        assert vols["auth"] == {"secretName": tokens, "items": [{"key": "token", "path": "token"}]}
    assert not [d for d in render(helm, chart, "--set", "helmTest.enabled=false") if d["kind"] == "Pod"]
