"""Milvus wiring (URI, token only from a Secret), the wait-for-Milvus init container, the migrate
hook and the sharded ingest Job."""
from __future__ import annotations

import yaml

from chart_kit import (CHART, EXTERNAL_URI, PROFILES, RELEASE, SECRET_FLAGS, SETTING_ENVS, chart, configmap_data,
                       docs_of, env_of, helm, one, pod_spec, profile, render)



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
    assert {k: env[k]["value"] for k in SETTING_ENVS if k in env} == configmap_data(docs)


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
