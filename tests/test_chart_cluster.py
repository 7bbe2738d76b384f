"""values-cluster.yaml (an external Milvus cluster, autoscaled serve, sharded ingest) renders valid
Kubernetes objects with what it promises, and values.schema.json rejects a bad value in it."""
from __future__ import annotations

import pytest
import yaml

from chart_kit import (CHART, RELEASE, chart, configmap_data, env_of, helm, helm_run, kv, one, parse_serve_args,
                       pod_spec, render, strict_errors)

CLUSTER = CHART / "values-cluster.yaml"
INGEST = ["--set", "ingest.enabled=true", "--set", "ingest.domain=wiki", "--set", "ingest.corpus.existingClaim=corpus",
          "--set-json", 'ingest.corpus.files=["wiki/train.jsonl"]']


@pytest.fixture(scope="module")
def cluster_docs(helm, chart) -> list[dict]:
    return render(helm, chart, "-f", str(CLUSTER), *INGEST)


def test_cluster_profile_validates_strict(cluster_docs, kv):
    errors = strict_errors(kv, cluster_docs)
    assert not errors, "\n".join(errors)


def test_cluster_profile_objects(cluster_docs, monkeypatch):
    values = yaml.safe_load(CLUSTER.read_text())
    data = configmap_data(cluster_docs)
    assert data["KNNLM_URI"] == values["externalMilvus"]["uri"]
    assert (data["KNNLM_INDEX"], data["KNNLM_CONSISTENCY"]) == ("IVF_SQ8", "Bounded")
    hpa = one(cluster_docs, "HorizontalPodAutoscaler", "serve")
    auto = values["serve"]["autoscaling"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (auto["minReplicas"], auto["maxReplicas"])
    dep = one(cluster_docs, "Deployment", "serve")
    assert "replicas" not in dep["spec"]  # the autoscaler owns the replica count
    (c,) = pod_spec(dep)["containers"]
    assert parse_serve_args(c["args"], monkeypatch)["max_workers"] == values["serve"]["maxWorkers"]
    assert env_of(c)["KNNLM_MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "knnlm-milvus-token"
    assert pod_spec(dep)["affinity"]["podAntiAffinity"]
    names = {d["metadata"]["name"] for d in cluster_docs if d["kind"] == "Service"}
    assert f"{RELEASE}-knnlm-vdb-headless" in names
    (job,) = [d for d in cluster_docs if d["kind"] == "Job"
              and d["metadata"]["labels"].get("app.kubernetes.io/component") == "ingest"]
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == \
        ("Indexed", values["ingest"]["shards"], values["ingest"]["parallelism"])
    assert not [d for d in cluster_docs if d["metadata"]["name"].endswith("-milvus")]  # nothing bundled


def test_cluster_profile_lints(helm, chart):
    p = helm_run(helm, "lint", "--strict", str(chart), "-f", str(CLUSTER), *INGEST)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("path, bad, field", [
    (("settings", "consistency"), "Fast", "settings.consistency"),
    (("ingest", "parallelism"), 0, "ingest.parallelism"),
    (("ingest", "shards"), 0, "ingest.shards"),
    (("serve", "autoscaling", "minReplicas"), 0, "serve.autoscaling.minReplicas"),
    (("serve", "resources", "requests", "memory"), "lots", "serve.resources.requests.memory"),
    (("externalMilvus", "tokenSecret", "key"), "", "externalMilvus.tokenSecret.key"),
    (("serve", "autoscaling", "maxReplica"), 16, "serve.autoscaling"),  # a typo is an unknown key
])
def test_schema_rejects_a_bad_value_in_the_cluster_profile(helm, chart, tmp_path, path, bad, field):
    values = yaml.safe_load(CLUSTER.read_text())
    node = values
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = bad
    broken = tmp_path / "values-cluster.yaml"
    broken.write_text(yaml.safe_dump(values))
    p = helm_run(helm, "template", RELEASE, str(chart), "-f", str(broken), *INGEST)
    assert p.returncode != 0, f"{'.'.join(path)}={bad!r} rendered"
    assert "values don't meet the specifications of the schema" in p.stderr, p.stderr
    assert f"- {field}" in p.stderr, p.stderr


def test_cluster_profile_needs_the_cluster_uri(helm, chart):
    p = helm_run(helm, "template", RELEASE, str(chart), "-f", str(CLUSTER), "--set", "externalMilvus.uri=")
    assert p.returncode != 0 and "externalMilvus.uri is required" in p.stderr, p.stderr
