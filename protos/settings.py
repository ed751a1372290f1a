"""Command lines generated from pydantic configs, so each option is documented once (`Field(description=)`).

Environment overrides use the `COROLLA_` prefix (`COROLLA_MAX_CACHE_TOKENS=4096`); the command line wins.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

ENV_PREFIX = "COROLLA_"
Config = TypeVar("Config", bound=BaseModel)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(name: str, field: FieldInfo) -> list[str]:
    """The field's name, then the other names it accepts (`validation_alias=AliasChoices(...)`): an old
    option name keeps working, e.g. `--num-blocks` for `--span-length`."""
    names = [name]
    if isinstance(field.validation_alias, AliasChoices):
        names += [c for c in field.validation_alias.choices if isinstance(c, str) and c not in names]
    return names


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple, Sequence)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return bool in typing.get_args(annotation) and len(typing.get_args(annotation)) <= 2
    return False


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_class: type[BaseModel],
    *,
    positional: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> None:
    """One argparse option per field; `positional` fields become positional arguments."""
    for name, field in config_class.model_fields.items():
        if name in skip:
            continue
        text = field.description or ""
        if name in positional:
            parser.add_argument(name, help=text, nargs="+" if _is_list(field.annotation) else None)
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        help_text = f"{text} (default: {default})" if default not in (None, "", [], ()) else text
        options = [_option(each) for each in _names(name, field)]
        if _is_bool(field.annotation):
            parser.add_argument(
                *options, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif _is_list(field.annotation):
            parser.add_argument(*options, dest=name, nargs="+", default=None, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(*options, dest=name, default=None, metavar=name.upper(), help=help_text)


def config_from_arguments(
    config_class: type[Config], namespace: argparse.Namespace, *, environ: dict[str, str] | None = None
) -> Config:
    """Build the config: command line, then `COROLLA_*` environment variables, then field defaults."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    for name, field in config_class.model_fields.items():
        given = getattr(namespace, name, None)
        if given is None:
            given = next(
                (
                    environ[key]
                    for each in _names(name, field)
                    if (key := ENV_PREFIX + each.upper()) in environ
                ),
                None,
            )
            if given is not None and _is_list(field.annotation):
                given = given.split()
        if given is not None:
            values[name] = given
    return config_class.model_validate(values)


def parse_config(
    config_class: type[Config],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    positional: Sequence[str] = (),
) -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=description)
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
