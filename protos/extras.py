"""The optional dependencies (pyproject's extras) and the error that names the extra to install when a
command or module needs one that is missing. Knows nothing about what the commands do with them."""

from __future__ import annotations

import importlib.util

from protos.errors import CorollaError

# extra -> the top-level modules it provides; the ranges live in pyproject.toml
EXTRAS: dict[str, tuple[str, ...]] = {
    "api": ("fastapi", "starlette", "uvicorn"),
    "gguf": ("gguf",),
}


class MissingExtraError(CorollaError, ModuleNotFoundError):
    """A module of an optional extra is not installed; the message says how to install it."""

    def __init__(self, module: str, extra: str, *, needed_by: str) -> None:
        super().__init__(
            f"{needed_by} needs {module}, which is not installed: pip install 'corolla[{extra}]'", name=module
        )
        self.extra = extra


def extra_of(module: str) -> str | None:
    """The extra that provides `module` (or a submodule of it), or None."""
    top = module.partition(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def require_extra(extra: str, *, needed_by: str) -> None:
    """Raise MissingExtraError unless every module of `extra` can be imported; imports none of them."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(module, extra, needed_by=needed_by)


def missing_extra(error: ImportError, *, needed_by: str) -> MissingExtraError | None:
    """`error` as a MissingExtraError when the module it could not import belongs to an extra, else None."""
    if isinstance(error, MissingExtraError):
        return error
    if not isinstance(error, ModuleNotFoundError) or error.name is None:
        return None
    extra = extra_of(error.name)
    return None if extra is None else MissingExtraError(error.name, extra, needed_by=needed_by)
