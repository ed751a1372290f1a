"""deploy/ is real: every `corolla` invocation in the Dockerfile, docker-compose.yml, the systemd unit, the
Kubernetes manifests and deploy/README.md parses with that command's own parser and builds its configs
(environment included); every COROLLA_* variable is the per-command name (`COROLLA_SERVE_PORT`) of a setting
of the command it is given to, and deploy/ names no other (no shared `COROLLA_PORT`); every port is the
documented one (a command's default where it has one) and what the container, Service, probe or scraper uses;
the metrics deploy/README.md lists are the ones peers and the gateway serve; identities persist; stops leave
room for the drain; the image installs exactly as the README says, dependencies first; the bootstrap's address
is computed (`corolla peer-id`), never pasted; key files load as Kubernetes and systemd hand them over; and
every container has resource limits.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import resource
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, TypeAdapter
from swarm import start_dht

from client.config import ClientConfig, GatewayConfig, GenerateConfig
from client.gateway_metrics import GatewayMetrics
from client.metrics import ClientMetrics
from client.monitor import MonitorConfig
from peer.config import DhtConfig, PeerConfig
from peer.main import HEALTH_SERVICE, MAX_OPEN_FILES, raise_open_file_limit
from peer.metrics import PeerMetrics
from peer.scheduler import Scheduler
from peer.sessions import SessionTable
from protos import cli
from protos.health import LIVENESS
from protos.identity import Identity, multiaddress, private_file_problem
from protos.prepare import DEFAULT_MODEL_NAME, default_cache_dir
from protos.records import PeerRecord, PeerState
from protos.settings import (
    ENV_PREFIX,
    GENERAL_VARIABLES,
    command_prefix,
    config_from_arguments,
    env_names,
)
from protos.swarm_key import SwarmKey

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
README = (DEPLOY / "README.md").read_text()
CONFIGS: dict[str, tuple[type[BaseModel], ...]] = {
    "serve": (PeerConfig,),
    "dht": (DhtConfig,),
    "api": (GatewayConfig, ClientConfig),
    "peer-id": (),
    "monitor": (MonitorConfig, ClientConfig),
    "health": (ClientConfig,),
    "generate": (GenerateConfig, ClientConfig),
}
OTHER_ENV = {
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PATH",
    "HF_HOME",
}  # the interpreter's, pip's, transformers'
# deploy/entrypoint.sh passes the multiaddresses in this file as --initial-peers
ENTRYPOINT_ENV = "INITIAL_PEERS_FILE"
STOP_MARGIN = 10.0  # seconds a stop needs beyond the drain: the goodbye announcements, the DHT's shutdown
# what Kubernetes fills in from the downward API or a Secret, for parsing
FIELD_REFS = {"status.podIP": "10.1.2.3", "metadata.name": "corolla-peer-0"}
SECRET_VALUE = "k8s-secret-value"
REQUIRED_VALUE = "set-in-deploy-env"
# where the examples mount the swarm key (compose's secret, Kubernetes' Secret volume): a real key file stands
# in for them when parsing, since the commands check the file at the command line
SWARM_KEY_PATHS = {
    "/run/secrets/swarm_key",
    "/etc/corolla/swarm-key/key",
    "/run/credentials/corolla-peer.service/swarm.key",  # systemd's LoadCredential=
}


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
    if ENTRYPOINT_ENV in environ:  # what deploy/entrypoint.sh does
        args += ["--initial-peers", _bootstrap_maddr(invocation)]
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
    warned = _Warnings()
    settings_log = logging.getLogger("protos.settings")
    settings_log.addHandler(warned)
    try:
        for config_class in CONFIGS.get(invocation.command, ()):
            try:
                configs.append(config_from_arguments(config_class, namespace, environ=environ))
            except Exception as e:
                pytest.fail(f"{invocation.where}: {' '.join(args)}: {e}")
    finally:
        settings_log.removeHandler(warned)
    # an old shared name (deprecated) or a value dropped as meant for another command
    assert not warned.messages, f"{invocation.where}: {warned.messages}"
    return configs


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@functools.cache
def _stand_in_key() -> str:
    folder = Path(tempfile.mkdtemp(prefix="corolla-deploy-key-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    SwarmKey.create(folder / "swarm.key")
    return str(folder / "swarm.key")


@functools.cache
def _cached_invocations() -> tuple[Invocation, ...]:
    return tuple(all_invocations())


def _writes_initial_peers(writer: Invocation, reader: Invocation) -> bool:
    pod = writer.where.rpartition("/")[0] == reader.where.rpartition("/")[0]  # compose: both ""
    return (
        writer.kind == reader.kind
        and (pod or reader.kind != "k8s")
        and writer.command == "peer-id"
        and _option(writer.args, "--output") == reader.env[ENTRYPOINT_ENV]
    )


def _stand_in(value: str) -> str:
    return _stand_in_key() if value in SWARM_KEY_PATHS else value


@functools.cache
def _stand_in_peer_id() -> str:
    return Identity.load_or_create(None).peer_id


def _option(args: list[str], option: str) -> str | None:
    return args[args.index(option) + 1] if option in args else None


def _bootstrap_maddr(invocation: Invocation) -> str:
    """What the `corolla peer-id ... --output FILE` of the same deployment (in Kubernetes, of the same pod)
    writes to the file the invocation reads its initial peers from (with a stand-in peer id)."""
    [writer] = [other for other in _cached_invocations() if _writes_initial_peers(other, invocation)]
    host, port = _option(writer.args, "--host"), _option(writer.args, "--port")
    assert host is not None and port is not None, f"{writer.where}: no --host/--port"
    return multiaddress(host, int(port), _stand_in_peer_id())


def setting_names(command: str) -> set[str]:
    """COROLLA_* variables a command reads: `COROLLA_<COMMAND>_<OPTION>` for each field of its configs (and
    each field's other names) and its log level, and the general ones (the cache folder). The old shared
    names (`COROLLA_<OPTION>`), still read with a deprecation warning, are not among them."""
    names = set(GENERAL_VARIABLES)
    if CONFIGS.get(command):
        names.add(command_prefix(command) + "LOG_LEVEL")  # every generated parser's --log-level
    for config_class in CONFIGS.get(command, ()):
        names |= set(env_names(config_class, command))
    return names


def all_setting_names() -> set[str]:
    """Every COROLLA_* variable some command reads."""
    return set().union(*(setting_names(command) for command in cli.COMMANDS))


def check_env(invocation: Invocation) -> None:
    commands = (invocation.command, *invocation.env_shared_with)
    known = set().union(*(setting_names(command) for command in commands))
    for name in invocation.env:
        if name.startswith(ENV_PREFIX):
            assert name in known, (
                f"{invocation.where}: {name} is no setting of `corolla {' or '.join(commands)}`"
            )
        else:
            assert name in OTHER_ENV | {ENTRYPOINT_ENV}, (
                f"{invocation.where}: unexpected environment variable {name}"
            )


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


# systemd's state and runtime roots for system units, and the credentials of this one
SPECIFIERS = {
    "%S": "/var/lib",
    "%t": "/run",
    "${CREDENTIALS_DIRECTORY}": "/run/credentials/corolla-peer.service",
}


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
    """The checker itself: a misspelt variable, an old shared name, another command's variable and an
    unknown option fail; the command's own names pass."""
    for wrong in ("COROLLA_SERVE_METRIC_PORT", "COROLLA_METRICS_PORT", "COROLLA_API_PORT", "COROLLA_API_KEY"):
        with pytest.raises(AssertionError, match="no setting"):
            check_env(Invocation("x", ["serve"], {wrong: "1"}))
    check_env(
        Invocation("x", ["serve"], {"COROLLA_SERVE_METRICS_PORT": "1", "COROLLA_SERVE_SPAN_LENGTH": "2"})
    )
    check_env(Invocation("x", ["api"], {"COROLLA_API_API_KEY": "k", "COROLLA_API_MAX_LENGTH": "64"}))
    check_env(Invocation("x", ["monitor"], {"COROLLA_MONITOR_LOG_LEVEL": "DEBUG", "COROLLA_CACHE_DIR": "/c"}))
    with pytest.raises(AssertionError, match="no setting"):  # a unit's shared environment: only its commands
        check_env(Invocation("x", ["serve"], {"COROLLA_API_PORT": "1"}, env_shared_with=("prepare-model",)))
    with pytest.raises(AssertionError, match="usage: corolla serve"):
        parse(Invocation("x", ["serve", "m", "--num-blocks", "2", "--metrics-prot", "9700"]))
    with pytest.raises(pytest.fail.Exception):  # valid options, invalid together
        parse(Invocation("x", ["serve", "m", "--num-blocks", "2", "--blocks", "0:2"]))


def test_per_command_variables_configure_their_command() -> None:
    """What check_env accepts is what the command reads: a serve variable sets the peer's option, and a
    variable of another command leaves it at its default."""
    args = ["serve", "m", "--num-blocks", "2", "--new-swarm"]
    [peer] = parse(Invocation("x", args, {"COROLLA_SERVE_METRICS_PORT": "9701", "COROLLA_API_PORT": "1"}))
    assert isinstance(peer, PeerConfig) and peer.metrics_port == 9701 and peer.port == 0
    gateway, _ = parse(
        Invocation(
            "x", ["api", "m", "--initial-peers", "/dns4/dht/tcp/1/p2p/X"], {"COROLLA_API_API_KEY": "k" * 8}
        )
    )
    assert isinstance(gateway, GatewayConfig) and gateway.api_key == "k" * 8


def deploy_texts() -> dict[str, str]:
    """Every text file of deploy/ (the README, compose, the unit and its peer.env, the manifests, the
    entrypoint, the Dockerfile)."""
    return {
        str(path.relative_to(DEPLOY)): path.read_text()
        for path in sorted(DEPLOY.rglob("*"))
        if path.is_file() and path.suffix not in (".key",) and path.name not in (".env", "swarm.key")
    }


def test_deploy_names_only_per_command_variables() -> None:
    """Every COROLLA_* name anywhere in deploy/ (comments and prose included) is one a command reads:
    `COROLLA_<COMMAND>_<OPTION>` or a general one; `COROLLA_SERVE_<OPTION>` and `COROLLA_SERVE_*` (patterns)
    name a command's prefix."""
    known = all_setting_names()
    prefixes = {command_prefix(command) for command in CONFIGS if CONFIGS[command]} | {ENV_PREFIX}
    for where, text in deploy_texts().items():
        for match in re.finditer(r"\bCOROLLA_[A-Z0-9_]*", text):
            name = match.group()
            if text[match.end() : match.end() + 1] in ("<", "*"):
                assert name in prefixes, f"{where}: {name}... is no command's prefix"
            else:
                assert name in known, f"{where}: {name} is no command's variable (COROLLA_<COMMAND>_<OPTION>)"
    assert "COROLLA_SERVE_DRAIN_TIMEOUT" in known and "COROLLA_DRAIN_TIMEOUT" not in known  # the old name


def test_the_api_key_goes_from_deploy_env_to_the_gateway() -> None:
    """The variable the README writes into deploy/.env is the one compose interpolates into the api
    service, under the api's own name for --api-key."""
    [written] = re.findall(r'echo "(\w+)=\$\(openssl rand -hex 24\)" >> deploy/\.env', README)
    [name] = [variable for variable, field in env_names(GatewayConfig, "api").items() if field == "api_key"]
    assert written == name == "COROLLA_API_API_KEY"
    api = compose()["services"]["api"]
    assert str(api["environment"][name]).startswith(f"${{{name}:?")


def config_examples() -> list[tuple[str, str, str]]:
    """(where, command line, TOML) of every `toml` block of README.md and deploy/README.md: its first line is
    the command that reads it, as a comment (`# corolla serve MODEL --config peer.toml`)."""
    found = []
    for path in (REPO / "README.md", DEPLOY / "README.md"):
        for text in re.findall(r"^```toml\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE):
            first, _, body = text.partition("\n")
            assert first.startswith("# corolla "), f"{path.name}: a config example names its command first"
            found.append((path.name, first.removeprefix("# "), body))
    return found


def test_config_file_examples_set_what_they_say(tmp_path: Path) -> None:
    """The READMEs' `--config` examples parse with the command's own parser, and each key sets its option to
    the value written (a size in its units, a list as a list)."""
    examples = config_examples()
    assert examples, "README.md shows a --config file"
    for where, command, body in examples:
        args = shlex.split(command)[1:]
        file = tmp_path / str(_option(args, "--config"))
        file.write_text(body)
        args[args.index("--config") + 1] = str(file)
        configs = parse(Invocation(where, args))
        fields = {}
        for config_class in CONFIGS[args[0]]:
            fields |= {v: (config_class, f) for v, f in env_names(config_class, args[0]).items()}
        for key, value in tomllib.loads(body).items():
            config_class, name = fields[command_prefix(args[0]) + key.replace("-", "_").upper()]
            expected = TypeAdapter(config_class.model_fields[name].annotation).validate_python(value)
            assert getattr(one(configs, config_class), name) == expected, f"{where}: {key} = {value!r}"


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


# ---- metrics -------------------------------------------------------------------------------------------


def served_metrics() -> dict[str, set[str]]:
    """Every metric a peer, the gateway and a client serve, by the names a query uses (a counter's `_total`; a
    histogram's family and its `_bucket`, `_sum`, `_count`), with its labels but `model` (on every peer and
    gateway series) and `le`. Each labelled metric has a sample, so its labels show."""
    peer = PeerMetrics(model="m")
    record = PeerRecord(
        state=PeerState.ONLINE, address="127.0.0.1:1", start=0, end=2, throughput=1.0, free_cache_tokens=64,
        max_length=128, dtype="float32", version="1.0",
    )  # fmt: skip
    sessions = SessionTable(1024, idle_timeout=60, page_tokens=16)
    peer.watch(sessions=sessions, scheduler=Scheduler(), record=lambda: record, labels={"peer_id": "p"})
    peer.step(tokens=3, prompt=True, wait=0.001, seconds=0.01)
    peer.batch("step", 2)
    for counter in (peer.requests, peer.received, peer.sent):
        counter.labels("Info").inc()
    peer.errors.labels("Info", "OK").inc()
    gateway = GatewayMetrics("m", lambda: (1, 0))
    gateway.first_token_seen(0.1)
    gateway.finished(seconds=1.0, prompt_tokens=3, generation_tokens=4)
    gateway.requests.labels("m", "completions", "200").inc()
    client = ClientMetrics(CollectorRegistry())
    client.failovers.labels("UNAVAILABLE").inc()
    client.bans.labels("spot_check").inc()
    served: dict[str, set[str]] = {}
    for registry in (peer.registry, gateway.registry, client.registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            if family.name.endswith("_created"):
                continue  # prometheus_client's own; a peer serves none
            labels = {name for sample in family.samples for name in sample.labels} - {"model", "le"}
            names = {
                "counter": [family.name + "_total"],
                "histogram": [family.name + suffix for suffix in ("", "_bucket", "_sum", "_count")],
            }.get(family.type, [family.name])
            served |= dict.fromkeys(names, labels)
    return served


def test_the_documented_metrics_are_the_served_ones() -> None:
    """deploy/README.md's tables list every peer and gateway metric with exactly its labels, and every other
    mention of a metric (prose, the PromQL examples) names a served one with labels it has."""
    served = served_metrics()
    documented: dict[str, set[str]] = {}
    for line in README.splitlines():
        if line.startswith("| `corolla_"):
            for name, labels in re.findall(r"`(corolla_\w+)(?:\{([\w,]*)\})?`", line.split("|")[1]):
                documented[name] = set(filter(None, labels.split(",")))
    for name, labels in documented.items():
        assert served.get(name) == labels, f"{name}{{{','.join(sorted(labels))}}} is not served as documented"
    families = {
        name
        for name in served
        if name.startswith(("corolla_peer_", "corolla_gateway_"))
        and not name.endswith(("_bucket", "_sum", "_count"))
    }
    assert families <= documented.keys(), f"undocumented: {sorted(families - documented.keys())}"
    mentions = re.findall(r"\b(corolla_\w+)(?:\{([^}]*)\})?", README)
    assert len(mentions) > len(documented)
    for name, labels in mentions:
        assert name in served, f"deploy/README.md names {name}, which nothing serves"
        used = {part.split("=")[0].strip() for part in labels.split(",") if part.strip()}
        assert used <= served[name] | {"model"}, f"{name} has no label {used - served[name]}"


# ---- the image ---------------------------------------------------------------------------------------


# what the image's dependency layer installs
DEPENDENCIES = "pip install -r /tmp/requirements.txt -c deploy/requirements.lock"
SOURCES = ("protos", "peer", "client", "corolla")


def image_extras() -> list[str]:
    """The extras whose dependencies the image's dependency layer reads from pyproject.toml."""
    [run] = [rest for instruction, rest in dockerfile() if instruction == "RUN" and DEPENDENCIES in rest]
    return re.findall(r"\['optional-dependencies'\]\['(\w+)'\]", run)


def test_the_image_installs_as_the_readme_says() -> None:
    """The image's pip steps are the README's, `pip install .[EXTRAS]` split into the dependencies of
    pyproject.toml (with those extras) and the project itself without them."""
    arguments = image_args()
    runs = [rest for instruction, rest in dockerfile() if instruction == "RUN"]
    steps = []
    for run in runs:
        for command in re.split(r"\s*&&\s*|;\s*", run):
            command = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], command.strip())
            if command.startswith(("pip install", "python3.11 -m venv")):
                steps.append(" ".join(command.split()))
    assert DEPENDENCIES in steps and "pip install --no-deps ." in steps
    extras = ",".join(image_extras())
    steps[steps.index(DEPENDENCIES)] = f'pip install ".[{extras}]" -c deploy/requirements.lock'
    steps.remove("pip install --no-deps .")
    [install] = [
        block for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL) if "pip install" in block
    ]
    documented = [
        " ".join(line.split()) for line in install.splitlines() if line.startswith(("pip ", "python3.11 "))
    ]
    assert steps == documented
    makefile = (REPO / "Makefile").read_text()
    for pin in re.findall(r"pip install [^\n]*?(\S+==\S+)", "\n".join(steps)):
        assert pin in makefile, f"{pin} is not the Makefile's pin"
    assert [json.loads(rest) for instruction, rest in dockerfile() if instruction == "ENTRYPOINT"] == [
        ["corolla-entrypoint"]
    ]
    assert "COPY deploy/entrypoint.sh /usr/local/bin/corolla-entrypoint" in {
        f"{instruction} {rest}" for instruction, rest in dockerfile()
    }
    assert "The arguments of `docker run` are `corolla`'s" in README
    assert dockerfile()[0][0] == "ARG" and dockerfile()[1] == ("FROM", "${BASE_IMAGE}"), (
        "a base image argument"
    )
    assert "--build-arg BASE_IMAGE=nvidia/cuda:" in README


def test_every_image_runs_the_python_it_is_tested_with() -> None:
    """The CUDA variant's base has no Python: the image installs 3.11 (Ubuntu 22.04's package), never the
    distribution's default python3 (3.12 on Ubuntu 24.04)."""
    runs = " ".join(rest for instruction, rest in dockerfile() if instruction == "RUN")
    assert "python3.11 -m venv /opt/corolla" in runs
    assert "python3 " not in runs.replace("python3.11", "") and " python3-venv" not in runs
    assert "apt-get install -y --no-install-recommends python3.11 python3.11-venv" in runs
    bases = re.findall(r"BASE_IMAGE=(\S+)", README + (REPO / "deploy" / "Dockerfile").read_text())
    assert bases and all("python:3.11." in base or "ubuntu22.04" in base for base in bases), bases
    ignore = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if not line.startswith("#")
    ]
    copied = {
        path for instruction, rest in dockerfile() if instruction == "COPY" for path in rest.split()[:-1]
    }
    assert ignore[0] == "*" and {f"!{path}" for path in copied} <= set(ignore)


def test_the_image_caches_its_dependencies_and_pins_its_base() -> None:
    """Dependencies are installed from pyproject.toml alone before any source is copied (editing a source
    rebuilds only the layers after it); the base image is an exact release; the user is not root, by number
    (Kubernetes' runAsNonRoot can check a uid, not a name)."""
    steps = [f"{instruction} {rest}" for instruction, rest in dockerfile()]
    first_source = min(i for i, step in enumerate(steps) if step.startswith(("COPY protos", "COPY peer")))
    [manifest] = [i for i, step in enumerate(steps) if step.startswith("COPY pyproject.toml")]
    [dependencies] = [i for i, step in enumerate(steps) if DEPENDENCIES in step]
    assert manifest < dependencies < first_source
    assert steps[manifest] == "COPY pyproject.toml ./", "nothing but the dependency list in that layer"
    assert {f"COPY {source} ./{source}" for source in SOURCES} <= set(steps[first_source:])
    assert image_extras() == ["api", "gguf"]  # what `api`, `monitor` and `prepare-model` need
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image_args()["BASE_IMAGE"])
    [user] = [rest for instruction, rest in dockerfile() if instruction == "USER"]
    assert user == "1000:1000"
    assert "--uid 1000 corolla" in " ".join(steps)


def _fake_corolla(folder: Path) -> dict[str, str]:
    """An environment whose `corolla` prints its arguments, one per line."""
    program = folder / "corolla"
    program.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    program.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, ["serve", "/m", "--num-blocks", "2"]),
        (
            "/dns4/dht/tcp/31337/p2p/12D3KooWA\n",
            ["serve", "/m", "--num-blocks", "2", "--initial-peers", "/dns4/dht/tcp/31337/p2p/12D3KooWA"],
        ),
        (
            "/ip4/10.0.0.1/tcp/1/p2p/A\n/ip4/10.0.0.2/tcp/1/p2p/B\n",
            [
                "serve",
                "/m",
                "--num-blocks",
                "2",
                "--initial-peers",
                "/ip4/10.0.0.1/tcp/1/p2p/A",
                "/ip4/10.0.0.2/tcp/1/p2p/B",
            ],
        ),
    ],
)
def test_the_entrypoint_passes_the_initial_peers_file(
    tmp_path: Path, content: str | None, expected: list[str]
) -> None:
    env = _fake_corolla(tmp_path)
    if content is not None:
        (tmp_path / "initial-peers").write_text(content)
        env[ENTRYPOINT_ENV] = str(tmp_path / "initial-peers")
    done = subprocess.run(
        [str(DEPLOY / "entrypoint.sh"), "serve", "/m", "--num-blocks", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.splitlines() == expected


def test_the_entrypoint_refuses_a_missing_initial_peers_file(tmp_path: Path) -> None:
    env = _fake_corolla(tmp_path) | {ENTRYPOINT_ENV: str(tmp_path / "nothing")}
    done = subprocess.run(
        [str(DEPLOY / "entrypoint.sh"), "serve", "/m"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and done.stdout == "" and "missing or empty" in done.stderr


# ---- compose -------------------------------------------------------------------------------------------


def test_compose_persists_identities_drains_and_wires_ports() -> None:
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    targets = {
        (job.get("metrics_path", "/metrics"), target)
        for job in scraped
        for group in job["static_configs"]
        for target in group["targets"]
    }
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
            assert peer.model.startswith("/cache/models/") and mounts.get("/cache") == "cache"
            metrics_targets.add(("/metrics", f"{name}:{ports['metrics']}"))
        if invocation.command == "api":  # the gateway's /metrics, scraped by the service's name (its Host)
            assert name in one(configs, GatewayConfig).allowed_hosts, f"{name}: the scraper's Host is refused"
            metrics_targets.add(("/metrics", f"{name}:{ports['http']}"))
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
        if invocation.command in ("serve", "dht"):  # grpc.health.v1 "corolla": serving, not merely started
            check = " ".join(service["healthcheck"]["test"])
            assert f"insecure_channel('127.0.0.1:{ports['health']}')" in check, name
            assert (
                f"HealthCheckRequest(service='{HEALTH_SERVICE}')" in check
                and "!= h.HealthCheckResponse.SERVING" in check
            )
    assert targets == metrics_targets


def test_compose_services_have_resource_limits() -> None:
    for name, service in compose()["services"].items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[mg]", limits["memory"]), name


def test_compose_computes_the_bootstrap_address() -> None:
    """The `bootstrap` step reads the DHT's identity where the DHT keeps it and writes the address of the
    DHT's service and port into a volume every joining node reads; they start after it; nothing to paste."""
    services = compose()["services"]
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert "DHT_PEER_ID" not in text and "12D3KooW" not in text and "REPLACE" not in text
    invocations = {name: invocation for name, _, invocation in compose_invocations()}
    [writer] = [name for name, invocation in invocations.items() if invocation.command == "peer-id"]
    args = invocations[writer].args
    dht = one(parse(invocations["dht"]), DhtConfig)
    assert "--create" in args and _option(args, "--identity") == str(dht.identity)
    assert _mounts(services[writer])["/data"] == _mounts(services["dht"])["/data"]
    assert (_option(args, "--host"), int(str(_option(args, "--port")))) == ("dht", dht.port)
    assert services["dht"]["depends_on"][writer]["condition"] == "service_completed_successfully"
    output = PurePosixPath(str(_option(args, "--output")))
    joining = [
        name for name, invocation in invocations.items() if invocation.command in ("serve", "api", "monitor")
    ]
    assert len(joining) == 5
    for name in joining:
        invocation = invocations[name]
        assert invocation.env[ENTRYPOINT_ENV] == str(output), name
        assert _mounts(services[name])[str(output.parent)] == _mounts(services[writer])[str(output.parent)]
        assert services[name]["depends_on"]["dht"]["condition"] == "service_healthy", name
        [peers] = [config.initial_peers for config in parse(invocation) if hasattr(config, "initial_peers")]
        assert peers == [multiaddress("dht", dht.port, _stand_in_peer_id())], name


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume of a compose service."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


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
        if invocation.command == "api":  # the gateway's /metrics, scraped at the pod's IP
            annotations = doc["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(ports["http"]), where
            assert annotations["prometheus.io/path"] == "/metrics", where
        if invocation.command == "dht":  # its identity is a Secret: others compute its address from it
            volume = _volume_of(str(configs[0].identity), container)
            assert _pod_volumes(doc)[volume]["secret"]["secretName"] == "corolla-dht-identity", where
        if invocation.command == "serve":
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


def _pod_volumes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in doc["spec"]["template"]["spec"].get("volumes", [])}


def test_kubernetes_pods_compute_the_bootstrap_address() -> None:
    """Each pod that joins the swarm has an init container that computes the bootstrap's multiaddress from the
    identity the bootstrap node runs with (the same Secret) and the Service in front of it, into an emptyDir
    the serving container reads; only that init container mounts the bootstrap's key."""
    text = "".join(path.read_text() for path in (DEPLOY / "k8s").glob("*.yaml"))
    assert "REPLACE" not in text and "12D3KooW" not in text
    services = {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == "Service"}
    [(_, dht_doc, dht_container, _, dht_invocation)] = [
        each for each in k8s_invocations() if each[4].command == "dht"
    ]
    dht = one(parse(dht_invocation), DhtConfig)
    dht_secret = _pod_volumes(dht_doc)[str(_volume_of(str(dht.identity), dht_container))]["secret"]
    joining = 0
    for where, doc, container, init, invocation in k8s_invocations():
        if init or invocation.command not in ("serve", "api", "monitor"):
            continue
        joining += 1
        pod = doc["spec"]["template"]["spec"]
        [writer] = [c for c in pod["initContainers"] if c["args"][0] == "peer-id"]
        args = [str(arg) for arg in writer["args"]]
        identity = str(_option(args, "--identity"))
        assert PurePosixPath(identity).name == PurePosixPath(str(dht.identity)).name, where
        assert _pod_volumes(doc)[str(_volume_of(identity, writer))]["secret"] == dht_secret, where
        host, port = str(_option(args, "--host")), int(str(_option(args, "--port")))
        assert services[host]["spec"]["ports"][0]["port"] == port == dht.port, where
        output = str(_option(args, "--output"))
        assert invocation.env[ENTRYPOINT_ENV] == output, where
        shared = _volume_of(output, container)
        assert shared == _volume_of(output, writer) and "emptyDir" in _pod_volumes(doc)[str(shared)], where
        mounted = {mount["name"] for mount in container["volumeMounts"]}
        assert _volume_of(identity, writer) not in mounted, (
            f"{where}: the serving container holds the DHT's key"
        )
        [peers] = [config.initial_peers for config in parse(invocation) if hasattr(config, "initial_peers")]
        assert peers == [multiaddress(host, port, _stand_in_peer_id())], where
    assert joining == 3


def _volume_of(path: str, container: dict[str, Any]) -> str | None:
    """The volume that holds `path` in `container` (the deepest mount above it)."""
    mounts = sorted(container["volumeMounts"], key=lambda mount: len(mount["mountPath"]), reverse=True)
    for mount in mounts:
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return str(mount["name"])
    return None


# ---- private swarms, hardening, network policy (security review 3, L4) --------------------------------

SWARM_COMMANDS = ("dht", "serve", "api", "monitor")
KEY_SECRETS = ("corolla-swarm-key", "corolla-dht-identity")


def _raw_swarm_key(invocation: Invocation) -> str | None:
    """The swarm key path as the deploy file gives it (before `parse` stands a real file in for it)."""
    if "--swarm-key" in invocation.args:
        return invocation.args[invocation.args.index("--swarm-key") + 1]
    return invocation.env.get(command_prefix(invocation.command) + "SWARM_KEY")


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
            if "secret" not in volume or volume["secret"]["secretName"] not in KEY_SECRETS:
                continue
            mode = volume["secret"]["defaultMode"] | (0o040 if "fsGroup" in context else 0)
            _give(key, uid=0, gid=context.get("fsGroup", 0), mode=mode)
            assert private_file_problem(key, euid=context["runAsUser"]) is None, where
            assert os.stat(key).st_mode & 0o040 or os.stat(key).st_gid == 0  # readable by the pod's group
            checked += 1
    assert checked == 8  # the swarm key in 4 pods, the bootstrap's identity in 4
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


def _as_user(uid: int, load: Callable[[], object]) -> str:
    """`load()` in a child process of user and group `uid` (no other groups), as a pod's container runs it:
    what it returns, or the error it raises. (A fork: the interpreter lives where that user may not read.)"""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            text = f"ok {load()}"
        except Exception as e:
            text = f"error {e}"
        os.write(writer, text.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        text = pipe.read()
    os.waitpid(child, 0)
    return text


def test_a_secret_mounted_as_kubernetes_and_systemd_mount_it_loads_in_their_user(tmp_path: Path) -> None:
    """A swarm key and an identity as the kubelet leaves a Secret with `defaultMode: 0400` under `fsGroup`
    (root's, group 1000, 0440) and as systemd's `LoadCredential=` leaves it (root's, 0400 with an ACL for the
    service's user, which stat shows as 0440): `SwarmKey.load` and `Identity.load_or_create` take them in a
    process of uid/gid 1000. The same files readable by every user, or a user's own key its group may read,
    are refused."""
    if os.geteuid() != 0:
        pytest.skip("laying a file out as the kubelet does (root's, another group) needs root")
    folder = Path(tempfile.mkdtemp(prefix="corolla-secret-"))  # tmp_path's parents are closed to other users
    try:
        folder.chmod(0o755)
        key, identity = folder / "key", folder / "dht.key"
        fingerprint = SwarmKey.create(key).fingerprint
        expected_id = Identity.load_or_create(identity).peer_id
        for path in (key, identity):
            _give(path, uid=0, gid=1000, mode=0o440)
        assert _as_user(1000, lambda: SwarmKey.load(key).fingerprint) == f"ok {fingerprint}"
        assert _as_user(1000, lambda: Identity.load_or_create(identity).peer_id) == f"ok {expected_id}"
        _give(key, uid=1000, gid=1000, mode=0o400)  # LoadCredential= without ACLs: the service's user's own
        assert _as_user(1000, lambda: SwarmKey.load(key).fingerprint) == f"ok {fingerprint}"
        _give(key, uid=0, gid=1000, mode=0o444)
        assert "readable by others" in _as_user(1000, lambda: SwarmKey.load(key))
        _give(key, uid=1000, gid=1000, mode=0o440)
        assert "readable by others" in _as_user(1000, lambda: SwarmKey.load(key))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_systemd_unit_reads_keys_as_credentials_and_has_a_writable_hf_home() -> None:
    unit = systemd_unit()
    [serve] = [inv for inv in systemd_invocations() if inv.command == "serve"]
    [credential] = unit["LoadCredential"]
    name, _, source = credential.partition(":")
    assert PurePosixPath(source).parent == PurePosixPath("/etc/corolla")
    assert _option(serve.args, "--swarm-key") == f"{SPECIFIERS['${CREDENTIALS_DIRECTORY}']}/{name}"
    assert any(config.swarm_key for config in parse(serve))
    assert unit["ProtectSystem"] == ["strict"] and unit["DynamicUser"] == ["yes"]
    env = dict(_specified(each).split("=", 1) for each in unit["Environment"])
    state = Path(SPECIFIERS["%S"]) / unit["StateDirectory"][0]
    assert Path(env["HF_HOME"]).is_relative_to(state), "the only writable place under ProtectSystem=strict"
    max_rpcs = PeerConfig.model_fields["max_concurrent_rpcs"].default
    assert int(unit["LimitNOFILE"][0]) >= 16 * max_rpcs


@pytest.fixture
def open_file_limit() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_the_peer_raises_its_open_file_limit_to_the_hard_one(open_file_limit: tuple[int, int]) -> None:
    _, hard = open_file_limit
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if wanted <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    assert raise_open_file_limit() == wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)
    assert raise_open_file_limit() == wanted  # already there: unchanged


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ((1024, 4096), (4096, 4096)),
        ((1024, resource.RLIM_INFINITY), (MAX_OPEN_FILES, resource.RLIM_INFINITY)),
        ((4096, 4096), None),
        ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), None),
    ],
)
def test_the_open_file_limit_asked_for(
    monkeypatch: pytest.MonkeyPatch, limits: tuple[int, int], expected: tuple[int, int] | None
) -> None:
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits)
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: asked.append(value))
    raise_open_file_limit()
    assert asked == ([expected] if expected else [])


@pytest.mark.swarm
def test_peer_id_prints_what_a_running_dht_announces(tmp_path: Path) -> None:
    """`corolla peer-id` from the identity file alone equals the id (and, given its host and port, the
    multiaddress) that a `corolla dht` started with that file prints."""
    identity = tmp_path / "dht.key"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["peer-id", "--identity", str(identity), "--create"]) == 0
    peer_id = printed.getvalue().strip()
    dht = start_dht(tmp_path, "--identity", str(identity))
    try:
        [maddr] = [m for m in dht.maddrs if m.startswith("/ip4/127.0.0.1/")]
        port = int(maddr.split("/")[4])
        assert maddr.endswith(f"/p2p/{peer_id}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli.main(["peer-id", "--identity", str(identity), "--host", "127.0.0.1", "--port", str(port)])
        assert printed.getvalue().strip() == maddr
    finally:
        dht.stop()


def test_peer_id_refuses_what_the_node_would_refuse(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
        cli.main(["peer-id", "--identity", str(missing)])
    assert exit_info.value.code == 1 and not missing.exists()
    identity = tmp_path / "open.key"
    Identity.load_or_create(identity)
    identity.chmod(0o644)
    errors = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(errors):
        cli.main(["peer-id", "--identity", str(identity)])
    assert "readable by others" in errors.getvalue()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("dht", "/dns4/dht/tcp/1/p2p/X"),
        ("10.0.0.1", "/ip4/10.0.0.1/tcp/1/p2p/X"),
        ("[::1]", "/ip6/::1/tcp/1/p2p/X"),
    ],
)
def test_multiaddress(host: str, expected: str) -> None:
    assert multiaddress(host, 1, "X") == expected


def test_the_lock_is_the_tested_environment() -> None:
    """deploy/requirements.lock pins every distribution corolla[api,gguf] needs at the version installed here
    (`make install` installs through it, so a stale lock fails here, not in someone's image build)."""
    spec = importlib.util.spec_from_file_location("lock", REPO / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    versions = lock.locked_versions()
    assert {"torch", "transformers", "hivemind", "fastapi", "gguf", "grpcio", "pydantic"} <= versions.keys()
    assert "corolla" not in versions and versions["torch"] == "2.13.0"
    assert (REPO / "deploy" / "requirements.lock").read_text() == lock.lock_text(versions), "run `make lock`"
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK := deploy/requirements.lock" in makefile and "-e '.[dev]' -c $(LOCK)" in makefile
    assert "COPY deploy/requirements.lock ./deploy/" in {f"{i} {rest}" for i, rest in dockerfile()}
