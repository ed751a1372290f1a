"""One convention for every command (protos/settings.py): --log-level and --version, choices and sizes in
help, one name per idea with the old names kept, options grouped, environment variables per command,
--config FILE, and a prompt that follows --initial-peers. In-process: parsers built and given arguments."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from importlib.metadata import version
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from client import cli as client_cli
from client.config import ClientConfig, GatewayConfig, GenerateConfig
from peer.config import DhtConfig, PeerConfig
from protos import cli
from protos.settings import (
    OTHER_GROUP,
    add_config_arguments,
    command_parser,
    config_from_arguments,
    env_names,
)

MADDR = "/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWA"
OTHER_MADDR = "/dns4/dht/tcp/31337/p2p/12D3KooWB"
SERVE = ["m", "--blocks", "0:1", "--model-id", "m"]


def parse(command: str, argv: list[str], environ: dict[str, str] | None = None) -> list[BaseModel]:
    """The configs `corolla COMMAND ARGV` builds with `environ` (only) as its environment."""
    classes: dict[str, tuple[tuple[type[BaseModel], tuple[str, ...]], ...]] = {
        "serve": ((PeerConfig, ("model",)),),
        "dht": ((DhtConfig, ()),),
        "api": ((GatewayConfig, ("model",)), (ClientConfig, ())),
        "generate": ((GenerateConfig, ("model", "prompt")), (ClientConfig, ())),
    }
    parser = command_parser(f"corolla {command}", "test")
    for config_class, positional in classes[command]:
        add_config_arguments(parser, config_class, positional=positional)
    namespace = parser.parse_args(argv)
    return [config_from_arguments(c, namespace, environ=environ or {}) for c, _ in classes[command]]


def help_of(command: str) -> str:
    module, _, function = cli.COMMANDS[command][0].partition(":")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        getattr(importlib.import_module(module), function)(["--help"], prog=f"corolla {command}")
    return out.getvalue()


@pytest.fixture(autouse=True)
def no_requested_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_requested_level", None)


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"corolla {version('corolla')}"


@pytest.mark.parametrize(
    ("argv", "peers"),
    [
        (["M", "--initial-peers", MADDR, "Hi"], [MADDR]),
        (["M", "--initial-peers", MADDR, OTHER_MADDR, "Hi"], [MADDR, OTHER_MADDR]),
        (["--initial-peers", MADDR, OTHER_MADDR, "M", "Hi"], [MADDR, OTHER_MADDR]),
        (["M", "Hi", "--initial-peers", MADDR, OTHER_MADDR], [MADDR, OTHER_MADDR]),
        (["M", "--initial-peers", f"{MADDR},{OTHER_MADDR}", "Hi"], [MADDR, OTHER_MADDR]),
        (
            ["M", "--initial-peers", MADDR, "--initial-peers", OTHER_MADDR, "Hi", "--top-k", "3"],
            [MADDR, OTHER_MADDR],
        ),
    ],
)
def test_generate_takes_its_prompt_after_initial_peers(argv: list[str], peers: list[str]) -> None:
    args = client_cli._parser("corolla generate").parse_args(argv)
    generate = config_from_arguments(GenerateConfig, args, environ={})
    assert (generate.model, generate.prompt) == ("M", "Hi")
    assert config_from_arguments(ClientConfig, args, environ={}).initial_peers == peers


def test_peers_given_as_a_list_still_parse() -> None:
    """What client/local_swarm.py and the README pass: `--initial-peers A B` then other options."""
    (config,) = parse("serve", [*SERVE, "--initial-peers", MADDR, OTHER_MADDR, "--port", "5"])
    assert config.initial_peers == [MADDR, OTHER_MADDR] and config.port == 5
    (config,) = parse("serve", ["--initial-peers", MADDR, "m", "--blocks", "0:1"])
    assert config.model == "m"


@pytest.mark.parametrize("command", ["serve", "dht", "api", "generate", "health", "monitor"])
def test_every_command_lists_log_level_and_config(command: str) -> None:
    text = help_of(command)
    assert "--log-level {DEBUG,INFO,WARNING,ERROR,CRITICAL}" in text
    assert "--config FILE" in text
    assert f"COROLLA_{command.upper()}_<OPTION>" in text


def test_the_dispatcher_takes_log_level_for_every_command() -> None:
    assert cli.take_log_level(["FILE", "--log-level", "DEBUG"]) == (["FILE"], "DEBUG")
    assert cli.take_log_level(["--log-level=error", "x"]) == (["x"], "error")
    assert cli.take_log_level(["x", "--", "--log-level", "y"]) == (["x", "--", "--log-level", "y"], None)
    assert cli.main(["keygen", "--log-level", "LOUD", "/nonexistent/key"]) == 2


def test_choices_and_sizes_are_listed_in_help() -> None:
    serve, api = help_of("serve"), help_of("api")
    assert "--dtype {auto,float32,float16,bfloat16}" in serve
    assert "--quant {none,int8}" in serve and "--log-format {text,json}" in serve
    assert "--device {auto,cpu,cuda,cuda:N,mps}" in serve
    assert "--num-blocks {NUM_BLOCKS,auto}" in serve
    assert "--wire-dtype {float32,float16,bfloat16,int8}" in api and "--quant {none,any,int8}" in api
    generate = help_of("generate")
    assert "--dtype {float32,float16,bfloat16}" in generate and "--device {cpu,cuda,cuda:N,mps}" in generate
    assert "--speculative {ngram,DIR,none}" in generate and "--draft-tokens N" in generate
    assert "--metrics-port PORT" in generate and "--adapter NAME" in generate
    assert "--max-backward-bytes SIZE" in serve
    assert "(default: 8GiB)" in " ".join(serve.split())  # --max-backward-bytes
    assert "(default: 256MiB)" in " ".join(api.split())  # the client's --max-message-bytes


@pytest.mark.parametrize(("given", "expected"), [("2GiB", 2**31), ("512MB", 512 * 10**6), ("1048576", 2**20)])
def test_sizes_take_units(given: str, expected: int) -> None:
    (config,) = parse("serve", [*SERVE, "--max-kept-bytes", given])
    assert config.max_kept_bytes == expected
    (config,) = parse("serve", SERVE, {"COROLLA_SERVE_MAX_BACKWARD_BYTES": given})
    assert config.max_backward_bytes == expected


def test_one_name_per_idea_and_the_old_names_still_work() -> None:
    serve, api = help_of("serve"), help_of("api")
    assert "--num-blocks {NUM_BLOCKS,auto}, --span-length" in serve
    assert "--max-length MAX_LENGTH, --max-model-len MAX_LENGTH" in serve
    assert "--max-length MAX_LENGTH, --max-model-len MAX_LENGTH" in api
    (by_new,) = parse("serve", ["m", "--num-blocks", "3", "--max-model-len", "64"])
    (by_old,) = parse("serve", ["m", "--span-length", "3", "--max-length", "64"])
    assert by_new.span_length == by_old.span_length == 3 and by_new.max_length == by_old.max_length == 64
    gateway, _ = parse("api", ["m", "--initial-peers", MADDR, "--max-length", "100"])
    assert gateway.max_model_len == 100


def test_no_double_negatives() -> None:
    api = help_of("api")
    assert "--allow-anonymous" in api
    assert "allow-no-api-key" not in api and "--no-insecure" not in api and "--no-allow" not in api
    gateway, _ = parse("api", ["m", "--allow-no-api-key"])  # old command lines keep working
    assert gateway.allow_anonymous
    gateway, _ = parse("api", ["m"], {"COROLLA_API_ALLOW_NO_API_KEY": "1"})
    assert gateway.allow_anonymous


@pytest.mark.parametrize("config_class", [PeerConfig, DhtConfig, ClientConfig, GatewayConfig, GenerateConfig])
def test_every_option_is_in_a_group(config_class: type[BaseModel]) -> None:
    grouped = {name for names in config_class.option_groups.values() for name in names}  # type: ignore[attr-defined]
    ungrouped = set(config_class.model_fields) - grouped - {"model", "prompt"}  # positional arguments
    assert not ungrouped, f"{config_class.__name__}: add {sorted(ungrouped)} to option_groups"
    assert all(OTHER_GROUP not in help_of(command) for command in ("serve", "api", "generate"))


def test_environment_variables_belong_to_one_command(caplog: pytest.LogCaptureFixture) -> None:
    gateway, client = parse("api", ["m"], {"COROLLA_API_QUANT": "any", "COROLLA_SERVE_PORT": "1"})
    assert client.quant == "any" and gateway.port == 8000
    (peer,) = parse("serve", SERVE, {"COROLLA_API_QUANT": "any", "COROLLA_SERVE_MAX_CACHE_TOKENS": "77"})
    assert peer.quant == "none" and peer.max_cache_tokens == 77
    with pytest.raises(ValidationError, match="quant"):
        parse("serve", SERVE, {"COROLLA_SERVE_QUANT": "any"})
    assert "COROLLA_SERVE_MAX_CACHE_TOKENS" in env_names(PeerConfig, "serve")
    assert "COROLLA_API_MAX_MODEL_LEN" in env_names(GatewayConfig, "api")


def test_old_shared_names_warn_and_never_fail_another_command(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="protos.settings"):
        (peer,) = parse("serve", SERVE, {"COROLLA_QUANT": "any", "COROLLA_PORT": "8700"})
        _, client = parse("api", ["m"], {"COROLLA_QUANT": "any"})
    assert peer.quant == "none" and peer.port == 8700 and client.quant == "any"
    assert "COROLLA_PORT is deprecated: set COROLLA_SERVE_PORT" in caplog.text
    assert "COROLLA_QUANT='any' ignored" in caplog.text
    (peer,) = parse("serve", SERVE, {"COROLLA_PORT": "8700", "COROLLA_SERVE_PORT": "9"})
    assert peer.port == 9  # the command's own variable wins
    (peer,) = parse("serve", SERVE, {"COROLLA_CACHE_DIR": "/c"})
    assert peer.cache_dir is None  # a general variable, never read as an option


def test_config_file_is_below_environment_and_command_line(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text(
        f'max-cache-tokens = 100\nport = 5\ninitial_peers = ["{MADDR}"]\nnum-blocks = 2\n'
        'max-kept-bytes = "1GiB"\n'
    )
    (peer,) = parse("serve", ["m", "--config", str(path)])
    assert (peer.max_cache_tokens, peer.port, peer.initial_peers) == (100, 5, [MADDR])
    assert peer.span_length == 2 and peer.max_kept_bytes == 2**30
    environ = {"COROLLA_SERVE_MAX_CACHE_TOKENS": "200"}
    (peer,) = parse("serve", ["m", "--config", str(path)], environ)
    assert (peer.max_cache_tokens, peer.port) == (200, 5)
    (peer,) = parse("serve", ["m", "--config", str(path), "--max-cache-tokens", "300"], environ)
    assert peer.max_cache_tokens == 300


def test_generate_options_keep_their_defaults() -> None:
    generate, _ = parse("generate", ["M", "Hi"])
    assert generate == GenerateConfig(
        model="M",
        prompt="Hi",
        max_new_tokens=64,
        temperature=0.0,
        dtype="float32",
        device="cpu",
        draft_tokens=16,
    )
    assert (generate.top_p, generate.top_k, generate.seed, generate.speculative, generate.adapter) == (
        None,
    ) * 5
    assert not generate.chat and generate.metrics_port is None


def test_generate_options_from_environment_and_file(tmp_path: Path) -> None:
    path = tmp_path / "generate.toml"
    path.write_text(f'max_new_tokens = 5\ntemperature = 0.3\nchat = true\ninitial-peers = ["{MADDR}"]\n')
    environ = {"COROLLA_GENERATE_TEMPERATURE": "0.7", "COROLLA_GENERATE_DEVICE": "cuda:1"}
    generate, client = parse("generate", ["M", "Hi", "--config", str(path)], environ)
    assert (generate.max_new_tokens, generate.temperature, generate.chat) == (5, 0.7, True)
    assert generate.device == "cuda:1" and client.initial_peers == [MADDR]
    argv = ["M", "Hi", "--config", str(path), "--temperature", "0.9", "--max-new-tokens", "7", "--no-chat"]
    generate, _ = parse("generate", argv, environ)
    assert (generate.max_new_tokens, generate.temperature, generate.chat) == (7, 0.9, False)
    assert "COROLLA_GENERATE_TOP_P" in env_names(GenerateConfig, "generate")


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--top-p", "2"], {}, "--top-p: Input should be less than or equal to 1"),
        (["--top-p", "0"], {}, "--top-p: Input should be greater than 0"),
        ([], {"COROLLA_GENERATE_TOP_P": "2"}, "--top-p: Input should be less than or equal to 1"),
        (["--temperature", "-1"], {}, "--temperature: Input should be greater than or equal to 0"),
        (["--max-new-tokens", "0"], {}, "--max-new-tokens: Input should be greater than or equal to 1"),
        (["--top-k", "0"], {}, "--top-k: Input should be greater than or equal to 1"),
        (["--draft-tokens", "0"], {}, "--draft-tokens: Input should be greater than or equal to 1"),
        (["--metrics-port", "65536"], {}, "--metrics-port: Input should be less than or equal to 65535"),
        (["--device", "tpu"], {}, "--device: String should match pattern"),
        (["--dtype", "float64"], {}, "argument --dtype: invalid choice: 'float64'"),
        (["--seed", "one"], {}, "--seed: Input should be a valid integer"),
    ],
)
def test_a_bad_generate_option_is_a_usage_error(
    argv: list[str], environ: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_info:
        client_cli.main(["M", "Hi", "--initial-peers", MADDR, *argv], prog="corolla generate")
    assert exit_info.value.code == 2 and message in errors.getvalue()


def test_config_file_in_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml", reason="YAML config files need pyyaml")
    path = tmp_path / "peer.yaml"
    path.write_text(f"max_cache_tokens: 100\nnum_blocks: 1\ninitial-peers:\n  - {MADDR}\n")
    (peer,) = parse("serve", ["m", "--config", str(path)])
    assert (peer.max_cache_tokens, peer.initial_peers) == (100, [MADDR])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-cache-tokenz = 1\n", "unknown key 'max-cache-tokenz'"),
        ('model = "m"\n', "unknown key 'model'"),  # positional arguments stay on the command line
        ("max-cache-tokens = \n", "not valid TOML"),
    ],
)
def test_config_file_problems_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_info:
        parse("serve", [*SERVE, "--config", str(path)])
    assert exit_info.value.code == 2 and message in errors.getvalue()


def test_log_level_from_the_environment_or_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr("protos.settings.request_log_level", asked.append)
    parse("dht", [], {"COROLLA_DHT_LOG_LEVEL": "debug"})
    path = tmp_path / "dht.toml"
    path.write_text('log-level = "ERROR"\n')
    parse("dht", ["--config", str(path)])
    parse("dht", ["--config", str(path), "--log-level", "warning"])
    assert asked == ["DEBUG", "ERROR", "WARNING"]
    with pytest.raises(ValidationError, match="log_level"):
        parse("dht", [], {"COROLLA_DHT_LOG_LEVEL": "LOUD"})
