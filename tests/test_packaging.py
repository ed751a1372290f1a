"""What `pip install` gives a newcomer: the extras the issue names, no code-generation tools at run time, a
LICENSE matching the declared license, `python -m corolla`, `corolla.__version__`, and, without an extra, a
base install whose commands all start and say which extra a missing module is in (one subprocess with the
extras' modules hidden stands in for a fresh `pip install .`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

import corolla
from protos import cli
from protos.extras import EXTRAS, MissingExtraError, missing_extra

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
# modules that may need an extra to import at all: the gateway (its guard and metrics are imported by it
# only) and the protobuf code generator
NEEDS_EXTRA_TO_IMPORT = ("client.gateway", "protos.codegen")


def names(requirements: list[str]) -> set[str]:
    return {Requirement(requirement).name for requirement in requirements}


def test_the_extras_hold_what_only_some_commands_need() -> None:
    extras = PROJECT["project"]["optional-dependencies"]
    assert {"fastapi", "uvicorn"} <= names(extras["api"])
    assert names(extras["gguf"]) == {"gguf"}
    assert "gpu" in extras
    test = [Requirement(requirement) for requirement in extras["test"]]
    assert any(r.name == "corolla" and {"api", "gguf"} <= r.extras for r in test), "tests need api and gguf"
    assert any(Requirement(r).name == "corolla" and "test" in Requirement(r).extras for r in extras["dev"])
    runtime = names(PROJECT["project"]["dependencies"])
    assert not runtime & {"fastapi", "uvicorn", "gguf", "grpcio-tools"}, "only some commands need these"
    assert "grpcio-tools" in names(extras["test"]), "tests/test_wire.py runs the code generator"


def test_extras_modules_are_declared_in_their_extra() -> None:
    extras = PROJECT["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        # starlette comes with fastapi; the others are distributions of the same name
        assert set(modules) - {"starlette"} <= names(extras[extra]), extra


def test_license_file_is_the_declared_apache_license() -> None:
    project = PROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000, "the full text, not a notice"
    # an SPDX `license` string needs setuptools 77 to build
    [setuptools] = [Requirement(r) for r in PROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools.specifier.contains("77") and not setuptools.specifier.contains("76.9")


def test_every_package_ships_a_typed_marker() -> None:
    package_data = PROJECT["tool"]["setuptools"]["package-data"]
    for package in ("peer", "client", "protos", "corolla"):
        assert (ROOT / package / "py.typed").is_file() and "py.typed" in package_data[package], package


def test_version_is_the_installed_distributions() -> None:
    assert corolla.__version__ == version("corolla") == PROJECT["project"]["version"]


def test_python_m_corolla_is_the_corolla_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corolla", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == cli._usage() + "\n"
    for command in cli.COMMANDS:
        assert f"  {command} " in done.stdout


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("fastapi", "api"),
        ("fastapi.responses", "api"),
        ("uvicorn", "api"),
        ("starlette.types", "api"),
        ("gguf", "gguf"),
        ("numpy", None),
        (None, None),
    ],
)
def test_missing_extra_names_the_extra_of_a_missing_module(module: str | None, expected: str | None) -> None:
    problem = missing_extra(ModuleNotFoundError("gone", name=module), needed_by="corolla api")
    if expected is None:
        assert problem is None
    else:
        assert isinstance(problem, MissingExtraError) and isinstance(problem, ImportError)
        assert str(problem).startswith("corolla api needs ") and f"pip install 'corolla[{expected}]'" in str(
            problem
        )


def test_the_gateway_without_the_api_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # None in sys.modules: its import fails as if absent
    monkeypatch.delitem(sys.modules, "client.gateway", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'corolla\[api\]'"):
        __import__("client.gateway")


def test_gguf_conversion_without_the_gguf_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from protos.prepare import convert_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'corolla\[gguf\]'"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Run in a fresh interpreter whose extras' modules are hidden: import every module, ask every command for
# its --help, and start `monitor` and `api`, which need the [api] extra. Prints one JSON object.
_BASE_INSTALL = """
import contextlib, importlib, io, json, pkgutil, sys
hidden, needs_extra, maddr = sys.argv[1].split(","), tuple(sys.argv[2].split(",")), sys.argv[3]
for module in hidden:
    sys.modules[module] = None
from protos import cli
result = {"import_errors": {}, "help": {}}
for package in ("peer", "client", "protos", "corolla"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if not info.name.startswith(needs_extra):
            try:
                importlib.import_module(info.name)
            except ImportError as e:
                result["import_errors"][info.name] = repr(e)
for command in cli.COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main([command, "--help"])
        except SystemExit as e:
            result["help"][command] = [e.code, "usage:" in out.getvalue()]
for command in ("monitor", "api"):
    args = [command, *(["model-folder"] if command == "api" else []), "--initial-peers", maddr]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            result[command] = {"code": cli.main(args), "stderr": err.getvalue()}
        except BaseException as e:
            result[command] = {"raised": repr(e), "stderr": err.getvalue()}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def base_install() -> dict[str, Any]:
    hidden = sorted({module for modules in EXTRAS.values() for module in modules} | {"grpc_tools"})
    done = subprocess.run(
        [sys.executable, "-c", _BASE_INSTALL, ",".join(hidden), ",".join(NEEDS_EXTRA_TO_IMPORT), MADDR],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_base_install_imports_every_module_but_the_gateway(base_install: dict[str, Any]) -> None:
    assert base_install["import_errors"] == {}


def test_base_install_runs_every_commands_help(base_install: dict[str, Any]) -> None:
    assert base_install["help"] == {command: [0, True] for command in cli.COMMANDS}


def test_monitor_without_the_api_extra_says_how_to_install_it(base_install: dict[str, Any]) -> None:
    monitor = base_install["monitor"]
    assert monitor.get("code") == 1, monitor
    assert "corolla monitor needs " in monitor["stderr"] and "pip install 'corolla[api]'" in monitor["stderr"]
    assert "Traceback" not in monitor["stderr"]


def test_api_without_the_api_extra_says_how_to_install_it(base_install: dict[str, Any]) -> None:
    api = base_install["api"]
    assert api.get("code") == 1, api
    assert "pip install 'corolla[api]'" in api["stderr"] and "Traceback" not in api["stderr"]
