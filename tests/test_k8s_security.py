"""deploy/k8s security: every pod speaks mutual TLS with its own certificate (exec probes over
TLS, allow-lists on the servers), from Secrets that both the development script
(dev-secrets.sh) and the cert-manager resources make. Fast, no torch, no cluster."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.deploy_scripts import run_script
from tests.k8s_helpers import (
    IDENTITY,
    OVERLAYS,
    VERSIONS,
    Rendered,
    all_workloads,
    render_overlays,
    validate,
)
from tools.k8s import manifests as m

CERT_MANAGER = m.K8S_DIR / "cert-manager"
DEV_SECRETS = m.K8S_DIR / "dev-secrets.sh"
# Whom each server lets call its mutating RPCs: only the trainer pushes weights, only admin
# drives runs.
ALLOWED = {"policy": "trainer", "trainer": "admin"}
TLS_ENV = {"RLHF_TLS_CERT": "/certs/tls.crt", "RLHF_TLS_KEY": "/certs/tls.key",
           "RLHF_TLS_CA": "/certs/ca.crt"}  # fmt: skip
CA_SECRET = "rlhf-ca"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render_overlays(tmp_path_factory.mktemp("k8s"))


def test_servers_probe_health_over_tls(rendered: dict) -> None:
    """Kubernetes' grpc probes speak plaintext only: with TLS on, every probe runs `rlhf health`
    in the container (its RLHF_PORT and RLHF_TLS_* give the address and the certificate)."""
    servers = 0
    for overlay, obj, spec in all_workloads(rendered):
        if obj["kind"] == "Job":
            continue  # run-to-completion stages serve nothing
        for c in m.containers(spec):
            servers += 1
            assert m.env_value(c, "RLHF_PORT") and m.env_value(c, "RLHF_TLS_CA"), m.key(obj)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                where = (overlay, m.key(obj), probe)
                assert c[probe]["exec"]["command"] == ["rlhf", "health"], where
                assert "grpc" not in c[probe], where
                # A Python start plus a TLS handshake: more than the 1 s default.
                assert c[probe]["timeoutSeconds"] >= 5, where
    assert servers == 3 * len(OVERLAYS) + 1  # reward-b in reward-swap


def _certs_volume(spec: dict, c: dict) -> dict:
    mount = next(v for v in c["volumeMounts"] if v["mountPath"] == "/certs")
    assert mount["readOnly"] is True
    return next(v for v in spec["volumes"] if v["name"] == mount["name"])


def _secret_items(volume: dict) -> dict[str, dict[str, str]]:
    """Secret name -> {key: path} of a projected volume."""
    return {
        s["secret"]["name"]: {i["key"]: i["path"] for i in s["secret"]["items"]}
        for s in volume["projected"]["sources"]
    }


def test_every_pod_presents_its_own_certificate(rendered: dict) -> None:
    """Each workload mounts its own Secret's tls.crt/tls.key and the CA's ca.crt at /certs, and
    its RLHF_TLS_* variables point there; no stage Job holds a certificate."""
    seen = set()
    for overlay, obj, spec in all_workloads(rendered):
        for c in m.containers(spec):
            where = (overlay, m.key(obj), c["name"])
            identity = IDENTITY.get(c["name"])
            if identity is None:  # sft, rm: no network peers
                assert not any(n.startswith("RLHF_TLS") for n in m.env_names(c)), where
                continue
            seen.add(c["name"])
            assert {n: m.env_value(c, n) for n in TLS_ENV} == TLS_ENV, where
            volume = _certs_volume(spec, c)
            assert _secret_items(volume) == {
                f"rlhf-tls-{identity}": {"tls.crt": "tls.crt", "tls.key": "tls.key"},
                CA_SECRET: {"ca.crt": "ca.crt"},
            }, where
            # Readable by the pod's group (fsGroup 10001) only.
            assert volume["projected"]["defaultMode"] == 0o440, where
            assert spec["securityContext"]["fsGroup"] == 10001, where
    assert seen == set(IDENTITY)


def test_servers_listen_on_all_interfaces_with_allow_lists(rendered: dict) -> None:
    for overlay, obj, spec in all_workloads(rendered):
        if obj["kind"] == "Job":
            continue
        for c in m.containers(spec):
            where = (overlay, m.key(obj))
            assert m.env_value(c, "RLHF_HOST") == "0.0.0.0", where  # the default is loopback
            assert m.env_value(c, "RLHF_ALLOW_IDENTITY") == ALLOWED.get(c["name"]), where
            for off in ("RLHF_NO_AUTH", "RLHF_ALLOW_PLAINTEXT"):
                assert off not in m.env_names(c), where


def _dialled_names(rendered: dict) -> dict[str, set[str]]:
    """Secret -> the host names the trainer dials its pods by (RLHF_POLICY, RLHF_REWARD and the
    reward-swap overlay's allowed endpoints: HOST:PORT or dns:///HOST:PORT), found through the
    Service of that name and the Deployment it selects. TLS is checked against these names."""
    dialled: dict[str, set[str]] = {}
    for overlay in OVERLAYS:
        objects = rendered[overlay][1]
        trainer = m.pod_spec(m.find(objects, "StatefulSet", "trainer"))["containers"][0]
        addresses = [m.env_value(trainer, n) for n in ("RLHF_POLICY", "RLHF_REWARD")]
        addresses += (m.env_value(trainer, "RLHF_ALLOWED_ENDPOINTS") or "").split(",")
        for address in filter(None, addresses):
            host = address.removeprefix("dns:///").rpartition(":")[0]
            service = m.find(objects, "Service", host)
            selector = {"matchLabels": service["spec"]["selector"]}
            (workload,) = [
                o for o, _ in m.workloads(objects) if m.selects(selector, m.pod_labels(o))
            ]
            spec = m.pod_spec(workload)
            mounted = set(_secret_items(_certs_volume(spec, spec["containers"][0])))
            (secret,) = mounted - {CA_SECRET}
            dialled.setdefault(secret, set()).add(host)
    assert set(dialled) == {"rlhf-tls-policy", "rlhf-tls-reward", "rlhf-tls-reward-b"}
    return dialled


def _mounted_secrets(rendered: dict) -> set[str]:
    names = set()
    for _, _obj, spec in all_workloads(rendered):
        for volume in spec.get("volumes", []):
            if "projected" in volume:
                names |= set(_secret_items(volume))
    return names


def test_cert_manager_makes_the_mounted_secrets(rendered: dict) -> None:
    """deploy/k8s/cert-manager renders, and issues every Secret the pods mount (rlhf-ca aside,
    the trust bundle the operator makes from the CA's certificate) with the right identity."""
    objects = m.load(
        subprocess.run(
            [m.kubectl(), "kustomize", str(CERT_MANAGER)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    issuers = {o["metadata"]["name"] for o in objects if o["kind"] == "Issuer"}
    certificates = {
        o["spec"]["secretName"]: o["spec"] for o in objects if o["kind"] == "Certificate"
    }
    assert _mounted_secrets(rendered) - {CA_SECRET} == {f"rlhf-tls-{i}" for i in IDENTITY.values()}
    for name in _mounted_secrets(rendered) - {CA_SECRET}:
        spec = certificates[name]
        identity = name.removeprefix("rlhf-tls-")
        assert spec["commonName"] == identity and identity in spec["dnsNames"], name
        assert spec["issuerRef"]["name"] in issuers, name
        assert "client auth" in spec["usages"], name
        if identity == "admin":  # a client certificate only: it cannot serve
            assert "server auth" not in spec["usages"]
        else:  # the exec probes and port-forwards dial 127.0.0.1 / localhost
            assert "server auth" in spec["usages"], name
            assert "localhost" in spec["dnsNames"] and "127.0.0.1" in spec["ipAddresses"], name
        assert spec["privateKey"]["rotationPolicy"] == "Always", name
    # Every replica of a Deployment presents the one certificate, checked against the name the
    # trainer dials (dns:///policy:50051 reaches each pod's IP; the name is what TLS checks).
    for name, hosts in _dialled_names(rendered).items():
        assert hosts <= set(certificates[name]["dnsNames"]), (name, hosts)
    # The CA's key lives in a Secret that no pod mounts.
    ca = next(s for s in certificates.values() if s.get("isCA"))
    assert ca["secretName"] not in _mounted_secrets(rendered)


def test_dev_secrets_script_makes_the_mounted_secrets(rendered: dict, tmp_path: Path) -> None:
    """deploy/k8s/dev-secrets.sh: `rlhf certs`, then every mounted Secret as strict-valid YAML,
    each service certificate naming its service."""
    done = run_script(
        ["bash", str(DEV_SECRETS), "rlhf", str(tmp_path / "certs")], KUBECTL=m.kubectl()
    )
    assert done.returncode == 0, done.stderr
    path = tmp_path / "secrets.yaml"
    path.write_text(done.stdout)
    result = validate([path], VERSIONS[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    secrets = {s["metadata"]["name"]: s for s in m.load(done.stdout)}
    assert set(secrets) == _mounted_secrets(rendered)
    assert set(secrets[CA_SECRET]["data"]) == {"ca.crt"}  # the certificate, never the CA key
    for name, secret in secrets.items():
        if name == CA_SECRET:
            continue
        assert secret["type"] == "kubernetes.io/tls", name
        pem = base64.b64decode(secret["data"]["tls.crt"])
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        identity = name.removeprefix("rlhf-tls-")
        assert identity in dns, (name, dns)
        if identity != "admin":
            assert f"{identity}.rlhf.svc" in dns and "localhost" in dns, (name, dns)
    for name, hosts in _dialled_names(rendered).items():
        cert = x509.load_pem_x509_certificate(base64.b64decode(secrets[name]["data"]["tls.crt"]))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert hosts <= set(names.get_values_for_type(x509.DNSName)), (name, hosts)
