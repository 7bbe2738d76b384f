"""The chart lints (--strict) and every profile renders the objects it should, each one valid
against the Kubernetes API schemas (kubernetes-validate, strict)."""
from __future__ import annotations

import shutil

import pytest

from chart_kit import CHART, RELEASE, SERVE_SECURITY, chart, helm, helm_run, kv, profile, strict_errors



# --- tools ---------------------------------------------------------------------------------------

def test_helm_is_v3(helm):
    out = helm_run(helm, "version", "--short").stdout
    assert out.startswith("v3."), out


# --- lint ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, "values-gpu.yaml", "values-external.yaml", "values-secure.yaml",
                                    "values-cluster.yaml"])
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
    errors = strict_errors(kv, docs)
    assert not errors, f"profile {name}:\n" + "\n".join(errors)


def test_expected_objects(profile):
    name, docs = profile
    kinds = sorted((d["kind"], d["metadata"]["labels"].get("app.kubernetes.io/component", "")) for d in docs)
    want = [("ConfigMap", ""), ("Deployment", "serve"), ("Job", "migrate"), ("Service", "serve"),
            ("ServiceAccount", ""), ("PodDisruptionBudget", "serve"), ("Pod", "test")]
    if SERVE_SECURITY[name][:3] == (None, None, None):  # plaintext without tokens: only labelled clients
        want += [("NetworkPolicy", "serve")]
    if name in ("gpu", "full"):
        want += [("CronJob", "ingest"), ("Job", "ingest")]
    assert kinds == sorted(want)
    for doc in docs:
        assert doc["metadata"]["name"].startswith(RELEASE)
        # DNS labels; an Indexed Job's pods are also named <job>-<index>
        assert len(doc["metadata"]["name"]) <= (56 if doc["kind"] in ("Job", "CronJob") else 63)
