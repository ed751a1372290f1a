"""Command lines generated from pydantic configs, so each option is documented once (`Field(description=)`).

One convention for every command: options grouped by topic in help, enumerations listing their choices, sizes
as `8GiB`, environment variables per command (`COROLLA_SERVE_MAX_CACHE_TOKENS=4096`), `--config FILE` (TOML,
or YAML with pyyaml) and `--log-level`. The command line wins over the environment, the environment over
the file, the file over the defaults. Knows no command's fields: the configs name their groups and choices.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ByteSize, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import core_schema

from protos.cli import LOG_LEVELS, log_level_requested, request_log_level

logger = logging.getLogger(__name__)

ENV_PREFIX = "COROLLA_"
# read by every command for what it is (the cache folder), never as one command's option
GENERAL_VARIABLES = frozenset({"COROLLA_CACHE_DIR"})
MULTIADDRESS = r"^/(ip4|ip6|dns|dns4|dns6|dnsaddr|p2p)/"
OTHER_GROUP = "other options"
Config = TypeVar("Config", bound=BaseModel)

# what a parser built here remembers in its namespace (argparse copies parser defaults into it)
_FIELDS = "_corolla_fields"  # every accepted option name, dashes as underscores -> its field
_COMMAND = "_corolla_command"  # the command's environment prefix, COROLLA_SERVE_
_FILE = "_corolla_file"  # what --config FILE set, by field name


@dataclass(frozen=True)
class Choices:
    """Field metadata (`Annotated[str, Choices("a", "b")]`): the only values a field takes, checked by
    pydantic as a Literal would be and listed in the option's help."""

    values: tuple[str, ...]

    def __init__(self, *values: str) -> None:
        object.__setattr__(self, "values", values)

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.literal_schema(list(self.values))


@dataclass(frozen=True)
class Option:
    """Field metadata for the command line: `metavar` shown in help; `continues`, a pattern for list options:
    the words after the option that match it are more of its values, the first that does not is the next
    argument (`--initial-peers A B "prompt"`); `separator` splits one value into several (`A,B`); `hidden`,
    other names (of `validation_alias`) still accepted but not shown."""

    metavar: str | None = None
    continues: str | None = None
    separator: str | None = None
    hidden: tuple[str, ...] = ()


# `--initial-peers A B`, `--initial-peers A --initial-peers B` or `--initial-peers A,B`; a word after them
# that is no multiaddress (a prompt, a model folder) is the next argument
MULTIADDRESSES = Option(metavar="MADDR", continues=MULTIADDRESS, separator=",")


class CommandParser(argparse.ArgumentParser):
    """argparse, where a list option with `Option(continues=...)` takes only the words that match it."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(_split_lists(self, words), namespace)

    def format_usage(self) -> str:
        self._short_usage()
        return super().format_usage()

    def format_help(self) -> str:
        self._short_usage()
        return super().format_help()

    def _short_usage(self) -> None:
        """`corolla serve [options] model`: the options are listed below it, by group."""
        if self.usage is None:
            positional = [a.metavar or a.dest for a in self._actions if not a.option_strings]
            self.usage = " ".join(["%(prog)s", "[options]", *map(str, positional)])


def _split_lists(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """`--opt A B rest` as `--opt=A --opt=B rest` where B matches the option's pattern: an `=` value is
    exactly one value, so argparse never takes `rest` for the list."""
    patterns = {
        name: action.continues
        for action in parser._actions
        if isinstance(action, _Extend) and action.continues
        for name in action.option_strings
    }
    out: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            return out + words[index - 1 :]
        pattern = patterns.get(word)
        if pattern is None or index >= len(words) or words[index].startswith("-"):
            out.append(word)
            continue
        out.append(f"{word}={words[index]}")
        index += 1
        while index < len(words) and re.match(pattern, words[index]):
            out.append(f"{word}={words[index]}")
            index += 1
    return out


class _Extend(argparse.Action):
    """A list option: one or more values, repeatable, each value split at `separator`."""

    def __init__(self, *args: Any, continues: str | None = None, separator: str | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.continues, self.separator = continues, separator

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values:
            items += [v for v in value.split(self.separator) if v] if self.separator else [value]
        setattr(namespace, self.dest, items)


class _ConfigFile(argparse.Action):
    """`--config FILE`: read at parse time, so a bad file or an unknown key stops with a usage error."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        try:
            loaded = read_config_file(Path(values))
        except (OSError, ValueError) as e:
            parser.error(f"--config {values}: {e}")
        known: dict[str, str] = getattr(namespace, _FIELDS, {})
        unknown = [key for key in loaded if key.replace("-", "_") not in known]
        if unknown:
            parser.error(
                f"--config {values}: unknown key {', '.join(map(repr, unknown))} (keys are the options of "
                f"`{parser.prog}`, e.g. max-cache-tokens; positional arguments stay on the command line)"
            )
        setattr(namespace, _FILE, {known[key.replace("-", "_")]: value for key, value in loaded.items()})


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's top-level table: TOML, or YAML (`.yaml`, `.yml`) where pyyaml is installed."""
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("a YAML file needs pyyaml (pip install pyyaml); TOML needs nothing") from None
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML: {e}") from None
    else:
        try:
            loaded = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"not valid TOML: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError("expected a table of option = value")
    return loaded


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(name: str, field: FieldInfo) -> list[str]:
    """The names a field accepts: its `validation_alias=AliasChoices(...)` in order (the first is the one
    help shows first, e.g. `--num-blocks` before `--span-length`), and the field's own name."""
    names: list[str] = []
    if isinstance(field.validation_alias, AliasChoices):
        names += [c for c in field.validation_alias.choices if isinstance(c, str)]
    return [*names, name] if name not in names else names


def _metadata(field: FieldInfo, kind: type) -> Any:
    """The field's metadata of `kind`, also inside an optional (`Annotated[str, Choices(...)] | None`)."""
    candidates = list(field.metadata)
    for arg in typing.get_args(field.annotation):
        candidates += getattr(arg, "__metadata__", ())
    return next((each for each in candidates if isinstance(each, kind)), None)


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple, Sequence)


def _is_bool(annotation: Any) -> bool:
    members = [m for m in _members(annotation) if m is not type(None)]
    return members == [bool]


def _is_size(annotation: Any) -> bool:
    return ByteSize in _members(annotation)


def _choices(field: FieldInfo) -> tuple[tuple[str, ...], bool]:
    """The values a field lists in help, and whether they are all it takes (`int | Literal["auto"]` lists
    `auto` beside a number)."""
    marked = _metadata(field, Choices)
    if marked is not None:
        return tuple(marked.values), True
    members = [m for m in _members(field.annotation) if m is not type(None)]
    literals = [m for m in members if typing.get_origin(m) is Literal]
    values = tuple(str(value) for member in literals for value in typing.get_args(member))
    return values, bool(literals) and len(literals) == len(members)


def format_size(size: int) -> str:
    """`8589934592` as `8GiB`: the largest binary unit that divides it."""
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size and size % 2**power == 0:
            return f"{size >> power}{unit}"
    return f"{size}B"


def command_prefix(prog: str) -> str:
    """`corolla serve` -> `COROLLA_SERVE_`: the environment variables of one command."""
    return ENV_PREFIX + prog.split()[-1].upper().replace("-", "_") + "_"


def env_names(config_class: type[BaseModel], command: str) -> dict[str, str]:
    """The environment variables `corolla COMMAND` reads for `config_class`: variable -> field."""
    prefix = command_prefix(command)
    return {
        prefix + each.upper(): name
        for name, field in config_class.model_fields.items()
        for each in _names(name, field)
    }


def command_parser(prog: str, description: str) -> CommandParser:
    """A command's parser: a list option takes only the words that match it (`Option(continues=)`)."""
    return CommandParser(prog=prog, description=description)


def _group(parser: argparse.ArgumentParser, title: str) -> Any:
    existing = next((g for g in parser._action_groups if g.title == title), None)
    return existing if existing is not None else parser.add_argument_group(title)


def _add_general(parser: argparse.ArgumentParser) -> None:
    if parser.get_default(_COMMAND) is not None:
        return
    parser.set_defaults(**{_COMMAND: command_prefix(parser.prog), _FIELDS: {"log_level": "log_level"}})
    prefix = command_prefix(parser.prog)
    parser.epilog = (
        f"Every option can also be set as an environment variable {prefix}<OPTION> (e.g. {prefix}LOG_LEVEL="
        "DEBUG) or in a --config file; the command line wins over the environment, the environment over the "
        "file."
    )
    general = _group(parser, "general")
    general.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.upper, default=None, help="least level logged on stderr"
    )
    general.add_argument(
        "--config",
        action=_ConfigFile,
        metavar="FILE",
        default=None,
        help="read options from a TOML file (YAML with pyyaml), keys named as the options: "
        'max-cache-tokens = 4096, initial-peers = ["/ip4/..."]',
    )


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_class: type[BaseModel],
    *,
    positional: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> None:
    """One option per field, in the groups the config names (`option_groups`); `positional` fields become
    positional arguments."""
    _add_general(parser)
    groups: dict[str, Sequence[str]] = getattr(config_class, "option_groups", {})
    group_of = {name: title for title, names in groups.items() for name in names}
    known = dict(parser.get_default(_FIELDS))
    for title in groups:  # in the config's order, before any field joins one
        _group(parser, title)
    for name, field in config_class.model_fields.items():
        if name in skip:
            continue
        text = field.description or ""
        if name in positional:
            parser.add_argument(name, help=text, nargs="+" if _is_list(field.annotation) else None)
            continue
        names = _names(name, field)
        known.update({each: name for each in names})
        where = _group(parser, group_of.get(name, OTHER_GROUP)) if groups else parser
        _add_field(where, name, field, names)
    parser.set_defaults(**{_FIELDS: known})


def _add_field(where: Any, name: str, field: FieldInfo, names: list[str]) -> None:
    cli = _metadata(field, Option) or Option()
    shown = [_option(each) for each in names if each not in cli.hidden]
    hidden = [_option(each) for each in names if each in cli.hidden]
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    text = field.description or ""
    if default not in (None, "", [], (), False):
        text += f" (default: {format_size(default) if _is_size(field.annotation) else default})"
    if _is_bool(field.annotation):
        if default is False:  # a switch: --x turns it on; --no-x (old command lines) is hidden
            where.add_argument(*shown, dest=name, action="store_const", const=True, default=None, help=text)
            if hidden:
                where.add_argument(
                    *hidden, dest=name, action="store_const", const=True, help=argparse.SUPPRESS
                )
            negations = ["--no-" + each[2:] for each in [*shown, *hidden]]
            where.add_argument(
                *negations, dest=name, action="store_const", const=False, help=argparse.SUPPRESS
            )
            return
        where.add_argument(*shown, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        if hidden:
            where.add_argument(
                *hidden,
                dest=name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=argparse.SUPPRESS,
            )
        return
    options: dict[str, Any] = {"dest": name, "default": None}
    if _is_list(field.annotation):
        options.update(
            action=_Extend, nargs="+", metavar=cli.metavar or "VALUE", continues=cli.continues,
            separator=cli.separator,
        )  # fmt: skip
    else:
        choices, only = _choices(field)
        metavar = "SIZE" if _is_size(field.annotation) else names[0].upper()
        if only and cli.metavar is None:
            options.update(choices=choices)
        elif choices:  # a number or a word: {N,auto}
            options.update(metavar=cli.metavar or "{" + ",".join((metavar, *choices)) + "}")
        else:
            options.update(metavar=cli.metavar or metavar)
    where.add_argument(*shown, help=text, **options)
    if hidden:
        where.add_argument(*hidden, help=argparse.SUPPRESS, **options)


def config_from_arguments(
    config_class: type[Config], namespace: argparse.Namespace, *, environ: dict[str, str] | None = None
) -> Config:
    """Build the config: command line, then the command's environment variables (`COROLLA_SERVE_*`), then
    the --config file, then field defaults. The old shared names (`COROLLA_*`) are still read, with a
    warning, where the command has that option; a value of theirs this command refuses (it may have been
    meant for another command) is dropped with a warning, never failing the command."""
    environ = dict(os.environ if environ is None else environ)
    prefix = getattr(namespace, _COMMAND, None) or ENV_PREFIX
    from_file: dict[str, Any] = getattr(namespace, _FILE, None) or {}
    _apply_log_level(namespace, environ, prefix, from_file)
    values: dict[str, Any] = {}
    legacy: dict[str, str] = {}  # field -> the old variable its value came from
    for name, field in config_class.model_fields.items():
        given = getattr(namespace, name, None)
        names = _names(name, field)
        if given is None:
            given = next((environ[v] for each in names if (v := prefix + each.upper()) in environ), None)
        if given is None and prefix != ENV_PREFIX:
            old = next(
                (
                    v
                    for each in names
                    if (v := ENV_PREFIX + each.upper()) in environ and v not in GENERAL_VARIABLES
                ),
                None,
            )
            if old is not None:
                given, legacy[name] = environ[old], old
                logger.warning("%s is deprecated: set %s%s", old, prefix, names[0].upper())
        if isinstance(given, str) and _is_list(field.annotation):
            cli = _metadata(field, Option) or Option()
            given = given.replace(cli.separator, " ").split() if cli.separator else given.split()
        if given is None and name in from_file:
            given = from_file[name]
        if given is not None:
            values[name] = given
    for _ in range(len(legacy) + 1):  # bounded: each round drops at least one old variable or returns
        try:
            return config_class.model_validate(values)
        except ValidationError as e:
            refused = {str(err["loc"][0]) for err in e.errors() if err["loc"]} & set(legacy)
            if not refused:
                raise
            for name in refused:
                logger.warning(
                    "%s=%r ignored: not valid for this command (%s)",
                    legacy[name],
                    values.pop(name),
                    validation_problems(e),
                )
                legacy.pop(name)
    raise AssertionError("unreachable: every round drops an old variable")


class _General(BaseModel):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None


def _apply_log_level(
    namespace: argparse.Namespace, environ: dict[str, str], prefix: str, from_file: dict[str, Any]
) -> None:
    """--log-level (this parser's, or `corolla`'s own), else COMMAND_LOG_LEVEL, else the file's."""
    level = getattr(namespace, "log_level", None)
    if level is None and log_level_requested():
        return
    if level is None:
        level = environ.get(prefix + "LOG_LEVEL", from_file.get("log_level"))
    if level is not None:
        request_log_level(_General(log_level=str(level).upper()).log_level or "INFO")  # type: ignore[arg-type]


def parse_config(
    config_class: type[Config],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    positional: Sequence[str] = (),
) -> Config:
    parser = command_parser(prog, description)
    add_config_arguments(parser, config_class, positional=positional)
    namespace = parser.parse_args(list(argv))
    try:
        return config_from_arguments(config_class, namespace)
    except ValidationError as e:
        parser.error(validation_problems(e))


def validation_problems(error: ValidationError) -> str:
    """A config's validation errors as one command-line message, each named by its option."""
    problems = []
    for err in error.errors():
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{_option(str(err['loc'][0]))}: {message}" if err["loc"] else message)
    return "; ".join(problems)
