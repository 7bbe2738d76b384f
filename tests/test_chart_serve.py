"""The serve Deployment and Service: args serve parses, security (never open by accident), limits,
probes that answer, NOTES.txt."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from chart_kit import (CHART, NAMESPACE, PROFILES, RELEASE, SECRET_FLAGS, SERVE_SECURITY, chart, configmap_data,
                       env_of, healthcheck_module, helm, helm_run, one, parse_serve_args, pod_spec, profile, render,
                       serve_cli)



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
        hc = healthcheck_module()
        kubelet = c["livenessProbe"]["grpc"]["port"]
        assert hc.check(kubelet, timeout=5) == 0  # what the kubelet does: plaintext grpc.health.v1
        assert hc.probe(["/usr/bin/tini", "--", "knnlm-vdb", *c["args"]], env) == (kubelet, "grpc")
        if tls:
            assert kubelet != port and hc.check(port, timeout=2) == 1  # the gRPC port speaks only TLS
    finally:
        server.stop(0)


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
