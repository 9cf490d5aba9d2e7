"""deploy/k8s/ held to the code: stream, consumer and subject names against workers/protocol.py, ports against
envs/, probes, drain time, credentials; and KEDA's scaler pointed at each model's durable consumer.

No cluster, Helm or KEDA here: the manifests are parsed, and `kubectl kustomize` builds them where kubectl is
installed (skipped with the reason elsewhere). They were never applied.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers import protocol as p
from workers.config import ROOT

from .acl_support import credentials_module
from .deploy_support import (  # noqa: F401
    DEFAULT_WORKERS,
    IMAGE_DATA_DIR,
    SECRET_KEYS,
    SettingsOf,
    on_models_volume,
    port_of,
    settings_of_fixture,
)

K8S = ROOT / "deploy" / "k8s"


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, from every YAML file under deploy/k8s/ except the Helm values."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "nats-values.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc.get("metadata", {}).get("name", path.name))] = doc
    return out


def test_every_manifest_is_listed_by_a_kustomization() -> None:
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed |= {kustomization.parent / r for r in yaml.safe_load(kustomization.read_text())["resources"]}
    files = {f for f in K8S.rglob("*.yaml") if f.name not in ("kustomization.yaml", "nats-values.yaml")}
    assert files == listed


def test_each_default_worker_has_a_deployment_on_its_port_with_probes_and_a_drain(settings_of: SettingsOf) -> None:
    objects = manifests()
    common = objects[("ConfigMap", "fleet-worker-common")]["data"]
    for name in DEFAULT_WORKERS:
        s = settings_of(name)
        port, config = s.http_host_port[1], objects[("ConfigMap", f"worker-{name}")]["data"]
        pod = objects[("Deployment", f"worker-{name}")]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["python", "-m", "workers", name]
        assert [c["configMapRef"]["name"] for c in container["envFrom"]] == ["fleet-worker-common", f"worker-{name}"]
        assert port_of(config["HTTP_ADDR"]) == port
        assert config["NATS_INBOX_PREFIX"] == credentials_module().worker_identity(name).inbox
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        service = objects[("Service", f"worker-{name}")]["spec"]
        assert service["ports"][0]["port"] == port
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        drain = settings_of(name, DRAIN_TIMEOUT=common["DRAIN_TIMEOUT"]).drain_timeout
        assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5
        # MODEL_THREADS defaults from the node's cores: the ConfigMap sizes it to the pod's CPU limit. One batched
        # (or embedding) context uses MODEL_THREADS; ENGINE=contexts runs WORKER_CONCURRENCY contexts of as many.
        threads = int(config.get("MODEL_THREADS", s.model_threads))
        contexts = 1 if s.engine == "batched" or s.model_kind == "embedding" else s.worker_concurrency
        assert threads * contexts <= int(container["resources"]["limits"]["cpu"]), name


def test_a_worker_mounts_the_models_volume_when_its_model_file_is_there(settings_of: SettingsOf) -> None:
    """The models volume holds what `make models` leaves in data/models/; a model served from its package is in
    the image (Dockerfile), and its pod does not wait for a volume it does not read."""
    objects = manifests()
    assert objects[("ConfigMap", "fleet-worker-common")]["data"]["DATA_DIR"] == IMAGE_DATA_DIR
    for name in DEFAULT_WORKERS:
        pod = objects[("Deployment", f"worker-{name}")]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        if on_models_volume(settings_of, name):
            mount = mounts["/app/data/models"]
            assert mount["readOnly"] is True and claims[mount["name"]]["claimName"] == "fleet-models", name
        else:
            assert "/app/data/models" not in mounts and not claims, name


def test_deployments_take_credentials_from_secrets_as_files() -> None:
    objects = manifests()
    monitor = credentials_module().named("monitor", "monitor")
    assert objects[("ConfigMap", "monitor")]["data"]["NATS_INBOX_PREFIX"] == monitor.inbox
    assert not [key for key in objects if key[0] == "Secret"], "Secrets are created by the operator, not shipped"
    for (kind, name), obj in objects.items():
        if kind == "ConfigMap":
            assert not SECRET_KEYS & set(obj["data"]), f"ConfigMap {name} holds a credential"
            assert "@" not in obj["data"].get("NATS_URL", ""), f"ConfigMap {name}: credentials in NATS_URL"
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        for env in container.get("env", []):
            assert "value" not in env or env["name"] not in SECRET_KEYS, f"{name}: {env['name']} inline"
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/run/secrets/fleet")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "secret" in volume or all("secret" in s for s in volume["projected"]["sources"])


def test_scaled_objects_scale_each_model_on_its_own_durable_consumer(settings_of: SettingsOf) -> None:
    objects = manifests()
    for name in DEFAULT_WORKERS:
        kind = settings_of(name).model_kind
        subjects = {"nats-llm-fleet/request-subject": p.request_subject(kind, name),
                    "nats-llm-fleet/queue-subject": p.queue_subject(kind, name)}
        deployment = objects[("Deployment", f"worker-{name}")]
        assert deployment["metadata"]["annotations"] == {**subjects, "nats-llm-fleet/stream": p.STREAM_NAME,
                                                         "nats-llm-fleet/consumer": p.consumer_name(kind, name)}
        scaled = objects[("ScaledObject", f"worker-{name}")]
        assert scaled["metadata"]["annotations"] == subjects
        assert scaled["spec"]["scaleTargetRef"]["name"] == f"worker-{name}"
        assert scaled["spec"]["minReplicaCount"] >= 1, "at 0 the model has no ingress: requests find no responder"
        (trigger,) = scaled["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream"
        assert (meta["stream"], meta["consumer"]) == (p.STREAM_NAME, p.consumer_name(kind, name))
        # a pod's worth: WORKER_CONCURRENCY running and as many waiting
        assert int(meta["lagThreshold"]) == 2 * settings_of(name).worker_concurrency, name
        assert meta["natsServerMonitoringEndpoint"] == "nats-headless.nats.svc.cluster.local:8222"


def test_the_keda_account_is_the_one_the_fleet_identities_belong_to(tmp_path: Path) -> None:
    credentials_module().generate(tmp_path, [], [], [], [])  # what scripts/nats_credentials.py writes
    block = re.search(r"accounts\s*[:=]?\s*\{(.*)", (tmp_path / "accounts.conf").read_text(), re.S)
    assert block is not None
    defined = set(re.findall(r"^\s*\"?([A-Za-z0-9_$-]+)\"?\s*[:=]?\s*\{", block.group(1), re.M))
    accounts = {o["spec"]["triggers"][0]["metadata"]["account"] for (k, _), o in manifests().items()
                if k == "ScaledObject"}
    assert accounts <= defined, f"KEDA reads account {accounts}; deploy/nats/accounts.conf defines {defined}"


def test_the_nats_chart_values_give_three_jetstream_nodes_on_files() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())["config"]
    assert values["cluster"] == {"enabled": True, "replicas": 3}
    assert values["jetstream"]["enabled"] and values["jetstream"]["fileStore"]["enabled"]
    assert values["monitor"] == {"enabled": True, "port": 8222}
    nodes = [f"nats://nats-{i}.nats-headless.nats.svc.cluster.local:4222" for i in range(3)]
    for (kind, name), obj in manifests().items():
        if kind == "ConfigMap" and "NATS_URL" in obj["data"]:
            assert obj["data"]["NATS_URL"].split(",") == nodes, name


def test_kubectl_kustomize_builds_the_manifests() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the manifests were only parsed")
    for folder in (K8S, K8S / "keda"):
        r = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
