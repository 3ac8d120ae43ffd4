"""What PEFT's adapter files say for each method: PEFT's type name and config fields, the state-dict
key of each adapter parameter, and tensors besides the per-layer ones (FRoD's bases).

One declaration per method, ``FORMAT`` in ``diffadapt/formats/peft/<method>.py`` (a
:class:`PeftFormat`); :mod:`diffadapt.checkpoint` (PEFT's folder layout) reads it. A method added
outside this package with :func:`diffadapt.methods.register` needs nothing more: without a
declaration it is written in the same folder layout under its own names (:func:`own_format`:
``peft_type`` = its name in capitals, each parameter under its own name, its config's fields as
they are). :func:`register` declares a real PEFT counterpart's names instead. The method files
hold math only.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor

from diffadapt.methods import AdapterConfig, AdapterConfigError, LayerSpec, Method, get_method, method_names
from diffadapt.record import SameNames

# keys PEFT writes into adapter_config.json that carry no method meaning
BOOKKEEPING = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
})


def _as_written(config: AdapterConfig, shapes: dict[str, tuple[int, ...]]) -> AdapterConfig:
    return config


def _nothing_extra(config: AdapterConfig, layers: list[LayerSpec], buffers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {}


@dataclass(frozen=True)
class PeftFormat:
    """One method's PEFT files.

    * ``peft_type``: PEFT's name of the method (``adapter_config.json``'s ``peft_type``);
    * ``keys``: adapter parameter name (ours) -> PEFT state-dict suffix after the module path;
    * ``to_dict`` / ``from_dict``: config -> the fields of PEFT's config class (without
      ``peft_type`` & co; refusing what PEFT cannot express) and back (bookkeeping keys ignored);
    * ``config_for_saved(config, shapes)``: the config a file's tensors were really trained with
      (``shapes``: our param name -> shape of one layer's tensor); default: as written;
    * ``extra_state(config, layers, buffers)``: tensors the file holds besides per-layer parameters;
    * ``shared_from_saved(config, layers, weights, saved)``: the method's shared state
      (``Method.init_shared``'s output) from those tensors; None: the method has none.
    """

    peft_type: str
    keys: dict[str, str]
    to_dict: Callable[[Any], dict[str, Any]]
    from_dict: Callable[[dict[str, Any]], Any]
    config_for_saved: Callable[[Any, dict[str, tuple[int, ...]]], Any] = _as_written
    extra_state: Callable[[Any, list, list], dict[str, Tensor]] = _nothing_extra
    shared_from_saved: Optional[Callable[[Any, list, list, dict], list]] = None


_REGISTERED: dict[str, PeftFormat] = {}


def register(method: str, fmt: PeftFormat) -> None:
    """Declare the PEFT format of a method that has no module in this package."""
    _REGISTERED[method.lower()] = fmt


def own_format(method: type[Method]) -> PeftFormat:
    """The folder format of a method with no PEFT declaration: its own names throughout."""
    config_class = method.config_class

    def to_dict(config: AdapterConfig) -> dict[str, Any]:
        return sorted_lists({k: v for k, v in config.to_dict().items() if k != "method"})

    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        return config_class.from_dict({k: v for k, v in data.items() if k not in BOOKKEEPING})

    return PeftFormat(method.name.upper(), SameNames(), to_dict, from_dict)


def format_of(method: str) -> PeftFormat:
    """The declaration of ``method``: registered, a module of this package, or (a method
    registered with :func:`diffadapt.methods.register` and nothing else) :func:`own_format`."""
    key = method.lower()
    if key not in _REGISTERED:
        module = f"{__name__}.{key}"
        if key.isidentifier() and importlib.util.find_spec(module) is not None:
            _REGISTERED[key] = importlib.import_module(module).FORMAT
        elif key in method_names():
            return own_format(get_method(key))  # not cached: the method may be registered again
        else:
            raise AdapterConfigError(f"Unknown adapter method {method!r}; choose one of {', '.join(method_names())}.")
    return _REGISTERED[key]


def to_peft_dict(config: AdapterConfig) -> dict[str, Any]:
    """Fields of PEFT's config class for ``config`` (without peft_type & co)."""
    return format_of(config.method).to_dict(config)


def from_peft_dict(method: str, data: dict[str, Any]) -> AdapterConfig:
    """``method``'s config from an ``adapter_config.json`` dict written by PEFT."""
    return format_of(method).from_dict(data)


def keys(method: str) -> dict[str, str]:
    """Adapter parameter name -> PEFT state-dict suffix."""
    return format_of(method).keys


def peft_type(method: str) -> str:
    return format_of(method).peft_type


def method_for_peft_type(name: str) -> type[Method]:
    """The method whose PEFT files say ``peft_type=name``."""
    known = [*method_names(), *(m for m in _REGISTERED if m not in method_names())]
    for method in known:
        if format_of(method).peft_type == name:
            return get_method(method)
    raise AdapterConfigError(
        f"PEFT type {name!r} is not a diffadapt method; supported: " + ", ".join(peft_type(m) for m in known)
    )


def shared_from_saved(
    method: type[Method], config: AdapterConfig, layers: list[LayerSpec], weights: list[Tensor], saved: dict[str, Tensor]
) -> list[dict[str, Tensor]]:
    """``method``'s shared state from the non-layer tensors of a file (``saved``, PEFT key names);
    a method without shared state accepts none."""
    fmt = format_of(method.name)
    if fmt.shared_from_saved is not None:
        return fmt.shared_from_saved(config, layers, weights, saved)
    if saved:
        raise AdapterConfigError(f"Unexpected tensors for a {method.name} adapter: {', '.join(sorted(saved)[:5])}.")
    return method.init_shared(config, layers, weights)


def sorted_lists(values: dict[str, Any], names: tuple[str, ...] = ("target_modules", "exclude_modules")) -> dict[str, Any]:
    """``values`` with the sets / tuples under ``names`` as sorted lists (what JSON and PEFT hold)."""
    for k in names:
        if isinstance(values.get(k), (set, tuple)):
            values[k] = sorted(values[k])
    return values
