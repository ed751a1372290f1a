"""deploy/ is real: every `corolla` invocation in the Dockerfile, docker-compose.yml, the systemd unit, the
Kubernetes manifests and deploy/README.md parses with that command's own parser and builds its configs
(environment included); every COROLLA_* variable is a setting of the command it is given to; every port is
the documented one (a command's default where it has one) and what the container, Service, probe or scraper
uses; identities persist; stops leave room for the drain; and the image installs exactly as the README says.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import io
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import pytest
import yaml
from pydantic import AliasChoices, BaseModel

from client.config import ClientConfig, GatewayConfig
from client.monitor import MonitorConfig
from peer.config import DhtConfig, PeerConfig
from peer.main import HEALTH_SERVICE
from protos import cli
from protos.health import LIVENESS
from protos.identity import Identity, private_file_problem
from protos.prepare import DEFAULT_MODEL_NAME, default_cache_dir
from protos.settings import ENV_PREFIX, config_from_arguments
from protos.swarm_key import SwarmKey

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
README = (DEPLOY / "README.md").read_text()
CONFIGS: dict[str, tuple[type[BaseModel], ...]] = {
    "serve": (PeerConfig,),
    "dht": (DhtConfig,),
    "api": (GatewayConfig, ClientConfig),
    "monitor": (MonitorConfig, ClientConfig),
    "health": (ClientConfig,),
    "generate": (ClientConfig,),
}
PROCESS_ENV = {"COROLLA_CACHE_DIR"}  # read by every command (protos.prepare.default_cache_dir)
OTHER_ENV = {
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PATH",
    "HF_HOME",
}  # the interpreter's, pip's, transformers'
STOP_MARGIN = 10.0  # seconds a stop needs beyond the drain: the goodbye announcements, the DHT's shutdown
# what Kubernetes fills in from the downward API or a Secret, for parsing
FIELD_REFS = {"status.podIP": "10.1.2.3", "metadata.name": "corolla-peer-0"}
SECRET_VALUE = "k8s-secret-value"
REQUIRED_VALUE = "set-in-deploy-env"
# where the examples mount the swarm key (compose's secret, Kubernetes' Secret volume): a real key file stands
# in for them when parsing, since the commands check the file at the command line
SWARM_KEY_PATHS = {"/run/secrets/swarm_key", "/etc/corolla/swarm-key/key"}


@dataclass
class Invocation:
    where: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # other commands given the same environment (a systemd unit's ExecStartPre): it may hold their settings
    env_shared_with: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def kind(self) -> str:
        """The kind of deployment it belongs to: a file of deploy/, or k8s."""
        where = self.where.split(":")[0]
        return "k8s" if where.startswith("k8s/") else where


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse(invocation: Invocation) -> list[BaseModel]:
    """The configs `corolla ARGS` builds with `env`, parsed by the command's own parser (caught the moment
    the command has parsed its arguments, before it runs anything). A parse error fails the test."""
    args = [_stand_in(arg) for arg in invocation.args]
    environ = {name: _stand_in(value) for name, value in invocation.env.items()}
    if args in (["--help"], ["-h"]):
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(args) == 0
        return []
    assert invocation.command in cli.COMMANDS, f"{invocation.where}: unknown command {invocation.command!r}"
    module, _, function = cli.COMMANDS[invocation.command][0].partition(":")
    entry = getattr(importlib.import_module(module), function)
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, *given: Any, **options: Any) -> argparse.Namespace:
        raise _Parsed(original(self, *given, **options))

    errors = io.StringIO()
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        contextlib.redirect_stderr(errors),
        contextlib.redirect_stdout(io.StringIO()),  # `--help` prints there
    ):
        try:
            entry(args[1:], prog=f"corolla {invocation.command}")
        except _Parsed as parsed:
            namespace = parsed.namespace
        except SystemExit as e:
            assert e.code == 0 and "--help" in args, (
                f"{invocation.where}: {' '.join(args)}\n{errors.getvalue()}"
            )
            return []
        else:
            pytest.fail(f"{invocation.where}: `corolla {invocation.command}` parsed no arguments")
    configs = []
    for config_class in CONFIGS.get(invocation.command, ()):
        try:
            configs.append(config_from_arguments(config_class, namespace, environ=environ))
        except Exception as e:
            pytest.fail(f"{invocation.where}: {' '.join(args)}: {e}")
    return configs


@functools.cache
def _stand_in_key() -> str:
    folder = Path(tempfile.mkdtemp(prefix="corolla-deploy-key-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    SwarmKey.create(folder / "swarm.key")
    return str(folder / "swarm.key")


def _stand_in(value: str) -> str:
    return _stand_in_key() if value in SWARM_KEY_PATHS else value


def setting_names(command: str) -> set[str]:
    """COROLLA_* variables a command reads: one per field of its configs (and each field's other names)."""
    names = set(PROCESS_ENV)
    for config_class in CONFIGS.get(command, ()):
        for name, info in config_class.model_fields.items():
            aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
            names |= {ENV_PREFIX + str(each).upper() for each in [name, *aliases]}
    return names


def check_env(invocation: Invocation) -> None:
    commands = (invocation.command, *invocation.env_shared_with)
    known = set().union(*(setting_names(command) for command in commands))
    for name in invocation.env:
        if name.startswith(ENV_PREFIX):
            assert name in known, (
                f"{invocation.where}: {name} is no setting of `corolla {' or '.join(commands)}`"
            )
        else:
            assert name in OTHER_ENV, f"{invocation.where}: unexpected environment variable {name}"


def one(configs: list[BaseModel], kind: type[BaseModel]) -> Any:
    return next(config for config in configs if isinstance(config, kind))


def listening_ports(invocation: Invocation, configs: list[BaseModel]) -> dict[str, int]:
    """The TCP ports a long-running command listens on, by role (none for `--help`)."""
    if not configs:
        return {}
    if invocation.command == "serve":
        peer = one(configs, PeerConfig)
        ports = {"grpc": peer.port, "dht": peer.dht_port}
        ports |= {"metrics": peer.metrics_port} if peer.metrics_port is not None else {}
        return ports | ({"health": peer.health_port} if peer.health_port is not None else {})
    if invocation.command == "dht":
        dht = one(configs, DhtConfig)
        return {"dht": dht.port} | ({"health": dht.health_port} if dht.health_port is not None else {})
    if invocation.command == "api":
        return {"http": one(configs, GatewayConfig).port}
    if invocation.command == "monitor":
        return {"http": one(configs, MonitorConfig).port}
    return {}


# ---- the files ------------------------------------------------------------------------------------------


def port_plan() -> set[int]:
    """The ports deploy/README.md's table documents."""
    return {int(port) for port in re.findall(r"^\| (\d{2,5}) \|", README, flags=re.MULTILINE)}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            steps.append((instruction.upper(), rest.strip()))
    return steps


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            env.update(dict(token.split("=", 1) for token in shlex.split(rest)))
    return env


def image_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for instruction, rest in dockerfile() if instruction == "ARG")


def _interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: the default; `${NAME:?error}` (which the user must set
    in deploy/.env): a stand-in value."""
    value = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", REQUIRED_VALUE, value)
    return re.sub(r"\$\{[A-Z_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_invocations() -> Iterator[tuple[str, dict[str, Any], Invocation]]:
    for name, service in compose()["services"].items():
        if not str(service.get("image", "")).startswith("corolla"):
            continue
        env = {k: _interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}
        args = [_interpolate(str(arg)) for arg in service["command"]]
        yield name, service, Invocation(f"docker-compose.yml:{name}", args, env)


def systemd_unit() -> dict[str, list[str]]:
    """key -> values of deploy/corolla-peer.service (keys repeat: Environment=, ExecStartPre=)."""
    entries: dict[str, list[str]] = {}
    for line in (DEPLOY / "corolla-peer.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


SPECIFIERS = {"%S": "/var/lib", "%t": "/run"}  # systemd's state and runtime roots for system units


def _specified(value: str) -> str:
    for specifier, path in SPECIFIERS.items():
        value = value.replace(specifier, path)
    return value


def systemd_invocations() -> list[Invocation]:
    unit = systemd_unit()
    env = dict(_specified(each).split("=", 1) for each in unit.get("Environment", []))
    [env_file] = unit["EnvironmentFile"]
    assert PurePosixPath(env_file).name == "peer.env", "the unit reads deploy/peer.env, installed"
    for line in (DEPLOY / "peer.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    invocations = []
    for key in ("ExecStartPre", "ExecStart"):
        for command in unit.get(key, []):
            program, *args = shlex.split(_specified(command))
            assert program == "/opt/corolla/bin/corolla", f"{key} runs {program}"
            invocations.append(Invocation(f"corolla-peer.service:{key}", args, env))
    commands = tuple(invocation.command for invocation in invocations)  # the unit's environment is shared
    for invocation in invocations:
        invocation.env_shared_with = commands
    return invocations


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["data"] for _, doc in manifests() if doc["kind"] == "ConfigMap"}


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    env = dict(image_env())
    for source in container.get("envFrom", []):
        env.update(config_maps()[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = FIELD_REFS[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in entry["valueFrom"], entry
            env[entry["name"]] = SECRET_VALUE
    return {k: v for k, v in env.items() if k not in OTHER_ENV}


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield f"k8s/{name}:{doc['metadata']['name']}", doc


def k8s_invocations() -> Iterator[tuple[str, dict[str, Any], dict[str, Any], bool, Invocation]]:
    """(workload name, workload, container, is an init container, invocation) of every corolla container."""
    for where, doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        for init, key in ((True, "initContainers"), (False, "containers")):
            for container in pod.get(key, []):
                assert container["image"].startswith("corolla:"), container["image"]
                assert "command" not in container, "the image's entrypoint is `corolla`"
                args = [str(arg) for arg in container["args"]]
                invocation = Invocation(f"{where}/{container['name']}", args, _container_env(container))
                yield where, doc, container, init, invocation


def readme_invocations() -> Iterator[Invocation]:
    """`corolla ...` and `docker run ... IMAGE ...` lines of deploy/README.md's shell blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens[:1] == ["corolla"]:
                yield Invocation("README.md", tokens[1:])
            elif tokens[:2] == ["docker", "run"]:
                image = next(i for i, token in enumerate(tokens) if token.startswith("corolla:"))
                yield Invocation("README.md", tokens[image + 1 :], image_env())


def all_invocations() -> list[Invocation]:
    found = [Invocation("Dockerfile:CMD", cmd(), image_env())]
    found += [invocation for _, _, invocation in compose_invocations()]
    found += systemd_invocations()
    found += [invocation for *_, invocation in k8s_invocations()]
    found += list(readme_invocations())
    return found


def cmd() -> list[str]:
    [args] = [json.loads(rest) for instruction, rest in dockerfile() if instruction == "CMD"]
    return args


# ---- every invocation, variable and port ---------------------------------------------------------------


@pytest.mark.parametrize("invocation", all_invocations(), ids=lambda i: f"{i.where}:{' '.join(i.args)[:40]}")
def test_every_invocation_parses_and_every_variable_is_a_setting(invocation: Invocation) -> None:
    parse(invocation)
    check_env(invocation)


def test_the_invocations_cover_every_kind_of_deployment() -> None:
    commands = {(invocation.kind, invocation.command) for invocation in all_invocations()}
    for wanted in [
        ("docker-compose.yml", "dht"),
        ("docker-compose.yml", "serve"),
        ("docker-compose.yml", "api"),
        ("docker-compose.yml", "monitor"),
        ("corolla-peer.service", "serve"),
        ("k8s", "serve"),
        ("k8s", "dht"),
        ("README.md", "monitor"),
        ("README.md", "serve"),
    ]:
        assert wanted in commands


def test_a_variable_that_is_no_setting_is_refused() -> None:
    """The checker itself: a misspelt variable and an unknown option fail."""
    with pytest.raises(AssertionError, match="no setting"):
        check_env(Invocation("x", ["serve"], {"COROLLA_METRIC_PORT": "1"}))
    with pytest.raises(AssertionError, match="usage: corolla serve"):
        parse(Invocation("x", ["serve", "m", "--num-blocks", "2", "--metrics-prot", "9700"]))
    with pytest.raises(pytest.fail.Exception):  # valid options, invalid together
        parse(Invocation("x", ["serve", "m", "--num-blocks", "2", "--blocks", "0:2"]))


def test_cache_dir_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_CACHE_DIR", "/cache")
    assert default_cache_dir() == Path("/cache")


def test_every_port_is_documented_and_defaults_are_kept() -> None:
    plan = port_plan()
    assert {31337, 8700, 31338, 9700, 8000, 8080} <= plan
    # commands whose port has a default keep it
    assert (
        GatewayConfig.model_fields["port"].default == 8000
        and MonitorConfig.model_fields["port"].default == 8080
    )
    for invocation in all_invocations():
        configs = parse(invocation)
        for role, port in listening_ports(invocation, configs).items():
            assert port in plan, f"{invocation.where}: {role} port {port} is not in deploy/README.md's table"
            if invocation.command in ("api", "monitor") and invocation.kind != "README.md":
                assert (
                    port
                    == one(configs, GatewayConfig if invocation.command == "api" else MonitorConfig)
                    .model_fields["port"]
                    .default
                )
    exposed = {
        int(port) for instruction, rest in dockerfile() if instruction == "EXPOSE" for port in rest.split()
    }
    assert exposed <= plan


# ---- the image ---------------------------------------------------------------------------------------


def test_the_image_installs_as_the_readme_says() -> None:
    arguments = image_args()
    runs = [rest for instruction, rest in dockerfile() if instruction == "RUN"]
    steps = []
    for run in runs:
        for command in re.split(r"\s*&&\s*|;\s*", run):
            command = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], command.strip())
            if command.startswith(("pip install", "python3 -m venv")):
                steps.append(" ".join(command.split()))
    [install] = [
        block for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL) if "pip install" in block
    ]
    documented = [
        " ".join(line.split()) for line in install.splitlines() if line.startswith(("pip ", "python3 "))
    ]
    assert steps == documented
    makefile = (REPO / "Makefile").read_text()
    for pin in re.findall(r"pip install [^\n]*?(\S+==\S+)", "\n".join(steps)):
        assert pin in makefile, f"{pin} is not the Makefile's pin"
    assert [json.loads(rest) for instruction, rest in dockerfile() if instruction == "ENTRYPOINT"] == [
        ["corolla"]
    ]
    assert (
        "`corolla` is its entrypoint" in README and "The arguments of `docker run` are `corolla`'s" in README
    )
    assert dockerfile()[0][0] == "ARG" and dockerfile()[1] == ("FROM", "${BASE_IMAGE}"), (
        "a base image argument"
    )
    assert arguments["BASE_IMAGE"].startswith("python:3.11")
    assert "--build-arg BASE_IMAGE=nvidia/cuda:" in README
    ignore = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if not line.startswith("#")
    ]
    copied = {rest.split()[0] for instruction, rest in dockerfile() if instruction == "COPY"}
    assert ignore[0] == "*" and {f"!{path}" for path in copied if path != "pyproject.toml"} <= set(ignore) | {
        "!README.md"
    }


# ---- compose -------------------------------------------------------------------------------------------


def test_compose_persists_identities_drains_and_wires_ports() -> None:
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    targets = {target for job in scraped for group in job["static_configs"] for target in group["targets"]}
    metrics_targets = set()
    for name, service, invocation in compose_invocations():
        configs = parse(invocation)
        ports = listening_ports(invocation, configs)
        assert service.get("restart") in ("unless-stopped", "always", "no"), name
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}
        if invocation.command in ("serve", "dht"):
            config = configs[0]
            assert config.identity is not None, f"{name}: a new identity at each start"
            folder = str(PurePosixPath(str(config.identity)).parent)
            assert folder in mounts and mounts[folder] in compose()["volumes"], f"{name}: identity not kept"
        if invocation.command == "serve":
            peer = one(configs, PeerConfig)
            assert _seconds(service["stop_grace_period"]) >= peer.drain_timeout + STOP_MARGIN
            assert peer.announce_host == name, f"{name}: other containers reach it by its service name"
            assert service["healthcheck"]["test"] == ["CMD", "test", "-f", str(peer.ready_file)]
            assert peer.model.startswith("/cache/models/") and mounts.get("/cache") == "cache"
            metrics_targets.add(f"{name}:{ports['metrics']}")
            dht_host, dht_port = _dns4(peer.initial_peers[0])
            dht = parse(next(inv for n, _, inv in compose_invocations() if n == dht_host))
            assert dht_port == one(dht, DhtConfig).port
        for published in service.get("ports", []):
            host_side, _, container = published.rpartition(":")
            assert host_side.startswith("127.0.0.1:"), f"{name}: published beyond this host"
            assert int(container) in ports.values()
        if "healthcheck" in service and invocation.command in ("api", "monitor"):
            url = re.search(r"http://127\.0\.0\.1:(\d+)/health", " ".join(service["healthcheck"]["test"]))
            assert url is not None and int(url.group(1)) == ports["http"]
    assert targets == metrics_targets


def _seconds(text: str) -> float:
    return float(text.removesuffix("s"))


def _dns4(maddr: str) -> tuple[str, int]:
    parts = maddr.split("/")
    assert parts[1] == "dns4" and parts[3] == "tcp" and parts[5] == "p2p", maddr
    return parts[2], int(parts[4])


# ---- systemd -------------------------------------------------------------------------------------------


def test_the_systemd_unit_restarts_keeps_its_identity_and_stops_within_the_drain() -> None:
    unit = systemd_unit()
    [serve] = [inv for inv in systemd_invocations() if inv.command == "serve"]
    [prepare] = [inv for inv in systemd_invocations() if inv.command == "prepare-model"]
    peer = one(parse(serve), PeerConfig)
    parse(prepare)
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"] and unit["KillMode"] == ["mixed"]  # the peer alone, not p2pd
    assert float(unit["TimeoutStopSec"][0]) >= peer.drain_timeout + STOP_MARGIN
    state = Path(SPECIFIERS["%S"]) / unit["StateDirectory"][0]
    assert peer.identity is not None and peer.identity.parent == state
    # the model is where `corolla prepare-model` (ExecStartPre) puts it, in the persistent state
    cache = Path(serve.env["COROLLA_CACHE_DIR"])
    assert Path(peer.model) == cache / "models" / DEFAULT_MODEL_NAME and cache == state
    assert (
        peer.ready_file is not None and peer.ready_file.parent == Path("/run") / unit["RuntimeDirectory"][0]
    )
    assert (
        peer.metrics_host == "127.0.0.1" and peer.metrics_port is not None
    )  # a volunteer's metrics stay local


# ---- Kubernetes --------------------------------------------------------------------------------------


def test_kubernetes_peers_persist_identity_and_cache_and_are_probed() -> None:
    services = {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == "Service"}
    for where, doc, container, init, invocation in k8s_invocations():
        configs = parse(invocation)
        if init:
            continue
        pod = doc["spec"]["template"]["spec"]
        ports = listening_ports(invocation, configs)
        named = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert set(named.values()) == set(ports.values()), where
        assert "readinessProbe" in container and "livenessProbe" in container, where
        for probe in (
            container[key] for key in ("startupProbe", "readinessProbe", "livenessProbe") if key in container
        ):
            if "exec" in probe:
                ready_file = configs[0].ready_file
                assert probe["exec"]["command"] == ["test", "-f", str(ready_file)], where
            elif "grpc" in probe:  # grpc.health.v1 on the health port: "" alive, "corolla" serving
                assert probe["grpc"]["port"] == ports["health"], where
                assert probe["grpc"].get("service", "") in (LIVENESS, HEALTH_SERVICE), where
            else:
                check = probe.get("httpGet") or probe["tcpSocket"]
                port = named.get(check["port"], check["port"])
                assert port in ports.values(), where
                if "httpGet" in probe:
                    assert check["path"] in ("/health", "/ready"), where
        if invocation.command in ("serve", "dht"):
            assert doc["kind"] == "StatefulSet", f"{where}: identity needs a stable volume"
            claims = {claim["metadata"]["name"] for claim in doc["spec"]["volumeClaimTemplates"]}
            config = configs[0]
            assert _volume_of(str(config.identity), container) in claims, f"{where}: identity kept"
        if invocation.command == "serve":
            peer = one(configs, PeerConfig)
            assert _volume_of(invocation.env["COROLLA_CACHE_DIR"], container) in claims, (
                f"{where}: cache kept"
            )
            assert pod["terminationGracePeriodSeconds"] >= peer.drain_timeout + STOP_MARGIN
            assert peer.announce_host == FIELD_REFS["status.podIP"]
            assert doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
                ports["metrics"]
            )
            host, port = _dns4(peer.initial_peers[0])
            bootstrap = services[host]
            assert bootstrap["spec"]["ports"][0]["port"] == port
            dht_pods = next(
                d for _, d in manifests() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == host
            )
            assert (
                bootstrap["spec"]["selector"].items()
                <= dht_pods["spec"]["template"]["metadata"]["labels"].items()
            )
    for name, service in services.items():
        selector = service["spec"]["selector"]
        [workload] = [
            doc
            for _, doc in workloads()
            if selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        ]
        container = workload["spec"]["template"]["spec"]["containers"][0]
        named = {port["name"]: port["containerPort"] for port in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert named.get(target, target) in named.values(), f"{name}: {port}"


def _volume_of(path: str, container: dict[str, Any]) -> str | None:
    """The volume that holds `path` in `container` (the deepest mount above it)."""
    mounts = sorted(container["volumeMounts"], key=lambda mount: len(mount["mountPath"]), reverse=True)
    for mount in mounts:
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return str(mount["name"])
    return None


# ---- private swarms, hardening, network policy (security review 3, L4) --------------------------------

SWARM_COMMANDS = ("dht", "serve", "api", "monitor")


def _raw_swarm_key(invocation: Invocation) -> str | None:
    """The swarm key path as the deploy file gives it (before `parse` stands a real file in for it)."""
    if "--swarm-key" in invocation.args:
        return invocation.args[invocation.args.index("--swarm-key") + 1]
    return invocation.env.get("COROLLA_SWARM_KEY")


def test_compose_and_kubernetes_run_a_private_swarm() -> None:
    secrets = compose().get("secrets", {})
    for name, service, invocation in compose_invocations():
        if invocation.command not in SWARM_COMMANDS:
            continue
        assert any(getattr(c, "swarm_key", None) for c in parse(invocation)), f"{name}: no swarm key"
        key = PurePosixPath(str(_raw_swarm_key(invocation)))
        assert key.parent == PurePosixPath("/run/secrets") and key.name in service.get("secrets", []), name
        assert key.name in secrets and secrets[key.name]["file"] == "./swarm.key", name
    assert "deploy/swarm.key" in (REPO / ".gitignore").read_text().splitlines()
    for where, doc, container, init, invocation in k8s_invocations():
        if init or invocation.command not in SWARM_COMMANDS:
            continue
        assert any(getattr(c, "swarm_key", None) for c in parse(invocation)), f"{where}: no swarm key"
        volume = _volume_of(str(_raw_swarm_key(invocation)), container)
        [source] = [v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == volume]
        assert source["secret"]["secretName"] == "corolla-swarm-key", where


def test_kubernetes_pods_are_hardened() -> None:
    for where, doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        if doc["spec"].get("volumeClaimTemplates") and "fsGroup" in context:
            # the default policy re-chmods every file on each mount: identity keys would turn 0660
            assert context["fsGroupChangePolicy"] == "OnRootMismatch", where
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            hardened = container["securityContext"]
            assert hardened["allowPrivilegeEscalation"] is False, where
            assert hardened["readOnlyRootFilesystem"] is True, where
            assert hardened["capabilities"]["drop"] == ["ALL"], where
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= limits.keys(), f"{where}/{container['name']}: no limits"
            tmp = _volume_of("/tmp/x", container)
            assert tmp is not None and "emptyDir" in volumes[tmp], f"{where}: /tmp must stay writable"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_kubernetes_network_policy_denies_all_but_the_swarm() -> None:
    policies = [doc for _, doc in manifests() if doc["kind"] == "NetworkPolicy"]
    [deny] = [p for p in policies if "ingress" not in p["spec"] and "egress" not in p["spec"]]
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    for where, doc, _container, init, invocation in k8s_invocations():
        if init:
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert _selects(deny["spec"]["podSelector"], labels), f"{where}: not covered by the default deny"
        allowed = {
            port["port"]
            for policy in policies
            if _selects(policy["spec"]["podSelector"], labels)
            for rule in policy["spec"].get("ingress", [])
            for port in rule.get("ports", [])
        }
        ports = listening_ports(invocation, parse(invocation))
        # health ports are the kubelet's (from the node); every other port a pod listens on is reachable
        assert {port for role, port in ports.items() if role != "health"} <= allowed, where
    egress = {
        port["port"]
        for policy in policies
        for rule in policy["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }
    assert {31337, 31338, 8700, 53} <= egress


def _give(path: Path, *, uid: int, gid: int, mode: int) -> None:
    try:
        os.chown(path, uid, gid)
    except PermissionError:
        pytest.skip("giving a file to root (as Kubernetes does) needs root")
    os.chmod(path, mode)


def test_mounted_key_files_pass_the_permission_check_the_peer_runs(tmp_path: Path) -> None:
    """Each Secret volume as the kubelet lays it out (root, group fsGroup, defaultMode plus group read), the
    compose secret as the README has it chowned, and an identity under each fsGroupChangePolicy, checked with
    `private_file_problem` for the pod's user: what `SwarmKey.load` and `Identity` run."""
    key = tmp_path / "key"
    SwarmKey.create(key)
    checked = 0
    for where, doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        context = pod["securityContext"]
        for volume in pod.get("volumes", []):
            if "secret" not in volume or volume["secret"]["secretName"] != "corolla-swarm-key":
                continue
            mode = volume["secret"]["defaultMode"] | (0o040 if "fsGroup" in context else 0)
            _give(key, uid=0, gid=context.get("fsGroup", 0), mode=mode)
            assert private_file_problem(key, euid=context["runAsUser"]) is None, where
            assert os.stat(key).st_mode & 0o040 or os.stat(key).st_gid == 0  # readable by the pod's group
            checked += 1
    assert checked == 4
    _give(key, uid=0, gid=1000, mode=0o444)  # a Secret readable by every user of the node
    assert "readable by others" in str(private_file_problem(key, euid=1000))
    _give(key, uid=1000, gid=1000, mode=0o600)  # compose: the host file, chowned as deploy/README.md says
    assert private_file_problem(key, euid=1000) is None
    identity = tmp_path / "identity.key"
    Identity.load_or_create(identity)
    _give(identity, uid=1000, gid=1000, mode=0o660)  # fsGroupChangePolicy Always, after a restart
    assert "readable by others" in str(private_file_problem(identity, euid=1000))
    _give(identity, uid=1000, gid=1000, mode=0o600)  # OnRootMismatch: as corolla wrote it
    assert private_file_problem(identity, euid=1000) is None
