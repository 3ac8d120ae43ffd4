"""Registry of adapter methods: the one list every face reads (configs, the training scripts'
flags and defaults, the test suites).

A built-in method is one file here plus one line in ``_BUILTIN``. A method defined anywhere else
joins with one call, :func:`register`; from then on ``add_adapter``, save / load, merge / unmerge
and the training scripts' ``--method`` / flags know it. What a face needs of a method is declared
on it:

* its config's dataclass fields: ``field(default=..., metadata={"flag": "--name", "help": "..."})``
  gives the field a command-line flag (of the field's type: int, float, str, or bool as a
  ``--name`` / ``--no-name`` pair); a field without ``"flag"`` has none (it is set through the
  scripts' ``--adapter_config``). :func:`config_flags` lists them;
* its ``Method`` class attributes ``learning_rate`` / ``embedded_learning_rate`` (the training
  scripts' starting points on a real model and on the small embedded one) and
  ``training_defaults`` (config fields the scripts set differently from the config's default).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from typing import NamedTuple

from diffadapt.methods.base import AdapterConfig, AdapterConfigError, LayerSpec, Method

_BUILTIN = {
    "fourierft": "diffadapt.methods.fourierft:FourierFT",
    "boft": "diffadapt.methods.boft:BOFT",
    "oft": "diffadapt.methods.oft:OFT",
    "hra": "diffadapt.methods.hra:HRA",
    "frod": "diffadapt.methods.frod:FRoD",
}
# name -> "module:Class" (imported on first use) or the class itself
_REGISTRY: dict[str, str | type[Method]] = dict(_BUILTIN)

METHOD_NAMES = tuple(_BUILTIN)  # the built-in methods; method_names() adds the registered ones
_FLAG_TYPES = (int, float, bool, str)


def method_names() -> tuple[str, ...]:
    """Every method known now: the built-in ones, then those added with :func:`register`."""
    return tuple(_REGISTRY)


def get_method(name: str) -> type[Method]:
    key = name.lower()
    if key not in _REGISTRY:
        raise AdapterConfigError(f"Unknown adapter method {name!r}; choose one of {', '.join(_REGISTRY)}.")
    entry = _REGISTRY[key]
    if isinstance(entry, str):
        module_name, cls_name = entry.split(":")
        entry = _REGISTRY[key] = getattr(importlib.import_module(module_name), cls_name)
    return entry


class ConfigFlag(NamedTuple):
    """A config field's command-line flag, from its dataclass metadata."""

    flag: str  # without the leading "--"
    field: str
    type: type  # int, float, bool (a --flag / --no-flag pair) or str
    help: str  # "<Method class name>: <the field's help>"


def config_flags(method: type[Method]) -> list[ConfigFlag]:
    """The flags ``method``'s config declares, in field order (see the module docstring)."""
    config = method.config_class
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        where = f"{config.__name__}.{f.name}"
        if not (isinstance(flag, str) and re.fullmatch(r"--[a-zA-Z][a-zA-Z0-9_]*", flag)):
            raise AdapterConfigError(f"{where}: metadata flag {flag!r} must look like '--name' (letters, digits, _).")
        if hints[f.name] not in _FLAG_TYPES:
            raise AdapterConfigError(
                f"{where}: a field of type {hints[f.name]} cannot have a flag (only int, float, bool or str)."
            )
        out.append(ConfigFlag(flag[2:], f.name, hints[f.name], f"{method.__name__}: {f.metadata.get('help', '')}"))
    return out


def _check_new(method: type[Method]) -> None:
    """What :func:`register` refuses: not a Method, a config that is not this method's, a name or
    a flag another method has already."""
    what = getattr(method, "__name__", repr(method))
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise AdapterConfigError(f"register: {what} is not a subclass of diffadapt.methods.Method.")
    name, config = getattr(method, "name", None), getattr(method, "config_class", None)
    if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name)):
        raise AdapterConfigError(f"register: {what}.name must be a lower-case identifier, got {name!r}.")
    if not (isinstance(config, type) and issubclass(config, AdapterConfig) and config.method == name):
        raise AdapterConfigError(
            f"register: {what}.config_class must be an AdapterConfig subclass with method = {name!r}, got {config!r}."
        )
    if not isinstance(getattr(method, "multiplicative", None), bool):
        raise AdapterConfigError(f"register: {what}.multiplicative must be True (W R^T) or False (W + dW).")
    if name in _REGISTRY:
        raise AdapterConfigError(f"register: a method named {name!r} is registered already ({get_method(name).__name__}).")
    flags = {f.flag for f in config_flags(method)}
    for other in map(get_method, _REGISTRY):
        taken = sorted(flags & {f.flag for f in config_flags(other)})
        if taken:
            raise AdapterConfigError(f"register: {what}: flag --{taken[0]} is {other.name!r}'s already.")


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` known to every part of diffadapt: ``get_method``, ``add_adapter``, its
    adapters' save / load (a saved config names its method), merge / unmerge, and the training
    scripts (``--method`` choices, its config's flags and training defaults).

    ``method`` is a :class:`Method` subclass with a lower-case ``name`` and a ``config_class``
    whose ``method`` is that name. Returns ``method`` (so it works as a class decorator too).
    Refuses, in one line naming it, a name or flag another method has already."""
    _check_new(method)
    _REGISTRY[method.name] = method
    return method


__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "ConfigFlag",
    "LayerSpec",
    "Method",
    "METHOD_NAMES",
    "config_flags",
    "get_method",
    "method_names",
    "register",
]
