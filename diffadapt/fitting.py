"""Fit a read adapter (:class:`diffadapt.record.AdapterRecord`) to a model: map the file's module
paths onto the model, check every tensor against the layer it belongs to (shapes from slots built
on the meta device, before anything is allocated) and build the filled slots, touching neither the
model nor the global RNG. :func:`diffadapt.model.install_slots` then puts them in. The middle step
of every load (see :mod:`diffadapt.record`); it knows no file format.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from diffadapt.host import SUPPORTED_LAYERS, AdapterHost, AdapterSlot, SavedModuleHost
from diffadapt.methods import AdapterConfig, AdapterConfigError, LayerSpec, Method, get_method
from diffadapt.model import _module, build_slots, select_saved_modules
from diffadapt.record import PREFIX, AdapterRecord, CheckpointError, SameNames, refusing, tensor_key, value_problem


SharedFactory = Callable[[list[LayerSpec], list[torch.Tensor]], list[dict[str, torch.Tensor]]]


@dataclass
class Fitted:
    """What :func:`fit` gives :func:`diffadapt.model.install_slots`: the config (paths mapped onto
    the model), the filled slots by module path, the ``modules_to_save`` values by module path."""

    config: AdapterConfig
    slots: dict[str, AdapterSlot]
    saved_modules: dict[str, dict[str, torch.Tensor]]


def _module_paths(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules()}


def _alternatives(path: str) -> tuple[str, ...]:
    return (path, path.removeprefix("text_model."), "text_model." + path)


def normalise_path(path: str, known: set[str]) -> Optional[str]:
    """Map a module path from a file onto this model (``text_model.`` differs across transformers)."""
    return next((alt for alt in _alternatives(path) if alt in known), None)


def normalise_config(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """``config`` with the full module paths it names (``modules_to_save`` entries, ``overrides`` /
    FourierFT ``n_frequency_pattern`` keys) mapped onto this model as tensor keys are
    (:func:`normalise_path`); suffixes and regexes stay as they are."""
    known = _module_paths(model)

    def fix(key: str) -> str:
        alt = normalise_path(key, known) if isinstance(key, str) else None
        return key if alt is None else alt

    changes: dict[str, Any] = {}
    if config.modules_to_save:
        fixed = [fix(k) for k in config.modules_to_save]
        if fixed != list(config.modules_to_save):
            changes["modules_to_save"] = fixed
    for name in ("overrides", "n_frequency_pattern"):
        table = getattr(config, name, None)
        if isinstance(table, dict) and table:
            fixed = {fix(k): v for k, v in table.items()}
            if list(fixed) != list(table):
                changes[name] = fixed
    return dataclasses.replace(config, **changes) if changes else config


def split_keys(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], keys: dict[str, str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module path: {param: tensor}}`` for layer tensors (``keys``: param -> key suffix), plus
    the method's other tensors."""
    suffixes = {v: k for k, v in keys.items()}
    known = _module_paths(model)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    extra, unknown, wrong = {}, [], []
    for key, value in tensors.items():
        body = key.removeprefix(PREFIX)
        if isinstance(keys, SameNames):  # <path>.<parameter name>
            hit = body.rpartition(".")[2] if "." in body else None
        else:
            hit = next((s for s in suffixes if body.endswith("." + s)), None)
        if hit is None:
            extra[key] = value
            continue
        path = normalise_path(body[: -len(hit) - 1], known)
        if path is None:
            unknown.append(f"{tensor_key(key)} {tuple(value.shape)}")
            continue
        module = model.get_submodule(path)
        if not isinstance(module, (AdapterHost, *SUPPORTED_LAYERS)):
            wrong.append(f"{tensor_key(key)} (a {type(module).__name__})")
            continue
        layers.setdefault(path, {})[suffixes.get(hit, hit)] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} adapter tensors name modules this {type(model).__name__} does not have "
            f"(a file for another architecture?): {', '.join(unknown[:5])}"
        )
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} adapter tensors name modules that are not Linear / Conv1D / Conv2d layers: {', '.join(wrong[:5])}"
        )
    if not layers:
        raise CheckpointError(
            f"The file holds no {config.method} tensors ({', '.join(tensor_key(k) for k in list(tensors)[:5])} ...)."
        )
    return layers, extra


def value_problems(
    keys: dict[str, str], layers: dict[str, dict[str, torch.Tensor]], extra: dict[str, torch.Tensor]
) -> list[str]:
    """Layer tensors must be finite floats; other tensors (FRoD's bases, indices) no complex/bool
    values and finite floats (``keys``: param -> key suffix, for the messages)."""
    problems = [p for name, values in layers.items() for k, v in values.items()
                for p in [value_problem(f"{PREFIX}{name}.{keys[k]}", v)] if p]
    for key, value in extra.items():
        if value.dtype.is_complex or value.dtype == torch.bool:
            problems.append(f"{tensor_key(key)} is {value.dtype}")
        elif value.dtype.is_floating_point and value.numel() and not bool(torch.isfinite(value).all()):
            problems.append(f"{tensor_key(key)} holds NaN/inf values")
    return problems


def _split_saved_modules(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list[str]]:
    """Take the ``modules_to_save`` tensors out of ``tensors``; check them against the modules."""
    saved = {n: {} for n in select_saved_modules(model, config)}
    rest = {}
    for key, value in tensors.items():
        body = key.removeprefix(PREFIX)
        owner = None
        for alt in _alternatives(body) if saved else ():  # text_model. as for layer keys
            owner = next((n for n in saved if alt.startswith(n + ".")), None)
            if owner is not None:
                body = alt
                break
        if owner is None:
            rest[key] = value
        else:
            saved[owner][body[len(owner) + 1 :]] = value
    problems = []
    for name, values in saved.items():
        module = model.get_submodule(name)
        expected = (module.original_module if isinstance(module, SavedModuleHost) else module).state_dict()
        problems += [f"missing {PREFIX}{name}.{k}" for k in expected if k not in values]
        problems += [f"unexpected {PREFIX}{name}.{tensor_key(k)}" for k in values if k not in expected]
        problems += [
            f"{PREFIX}{name}.{k}: file {tuple(v.shape)} vs module {tuple(expected[k].shape)}"
            for k, v in values.items()
            if k in expected and v.shape != expected[k].shape
        ]
        problems += [
            p for k, v in values.items() if k in expected
            for p in [value_problem(f"{PREFIX}{name}.{k}", v, expected[k].dtype)] if p
        ]
    return saved, rest, problems


def private_rng(model: nn.Module) -> contextlib.AbstractContextManager:
    """Loading draws initial values it then overwrites: keep the caller's global RNG (CPU and the
    model's CUDA devices) as it was, so that ``manual_seed`` + load + generate is reproducible."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def _problems_raise(problems: list[str], model: nn.Module, source: object) -> None:
    if problems:
        raise CheckpointError(
            f"Adapter in {source} does not fit this {type(model).__name__}: " + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )


def _compare(name: str, keys: dict[str, str], shapes: dict[str, tuple], values: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for key, shape in shapes.items():
        if key not in values:
            problems.append(f"missing {PREFIX}{name}.{keys[key]} {shape}")
        elif tuple(values[key].shape) != shape:
            problems.append(f"{PREFIX}{name}.{keys[key]}: file {tuple(values[key].shape)} vs layer {shape}")
    problems += [f"unexpected {name}.{k}" for k in values if k not in shapes]
    return problems


def _has_shared_state(method: type[Method]) -> bool:
    return method.init_shared.__func__ is not Method.init_shared.__func__


def _from_saved(record: AdapterRecord, config: AdapterConfig, saved: dict[str, torch.Tensor]) -> SharedFactory:
    """``build_slots``' shared state from the record's non-layer tensors."""
    return lambda specs, weights: record.shared_from_saved(config, specs, weights, saved)


def expected_shapes(
    model: nn.Module, config: AdapterConfig, names: list[str], shared: SharedFactory
) -> Optional[dict[str, dict[str, tuple]]]:
    """The parameter shapes ``config`` gives each layer of ``names``, from slots built on the meta
    device (nothing is allocated, whatever sizes the config asks for). Methods without shared
    state are built once per distinct (layer geometry, per-layer config). None when the method's
    init needs real values (FRoD solves with the base weights; its sizes come from the weights'
    shapes and the file's tensors, not from config numbers): the real slots are checked instead."""
    method = get_method(config.method)
    rep_of: dict[str, object] = {}
    reps: dict[object, str] = {}
    for n in names:
        key: object = n
        if not _has_shared_state(method):
            module = _module(model, n)
            weight = getattr(module, "weight", None)
            key = (type(module).__name__, tuple(weight.shape) if weight is not None else None, repr(config.for_layer(n)))
        rep_of[n] = key
        reps.setdefault(key, n)
    try:
        with private_rng(model):
            slots = build_slots(model, config, list(reps.values()), shared=shared, device="meta")
    except AdapterConfigError:
        raise
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" in str(exc).lower():
            return None
        raise
    shapes = {rep: {k: tuple(p.shape) for k, p in slots[rep].params().items()} for rep in reps.values()}
    return {n: shapes[reps[rep_of[n]]] for n in names}


def fit(model: nn.Module, record: AdapterRecord) -> Fitted:
    """Build the slots (and ``modules_to_save`` values) of a read adapter for ``model`` and fill
    them, without touching the model (nor the global RNG).

    Every tensor is checked against the layer it belongs to before anything is allocated (shapes
    from slots built on the meta device): a mismatch raises CheckpointError naming the first
    offending keys and shapes. Non-float or non-finite values are refused, naming the key.
    """
    source, keys = record.source, record.keys
    with refusing(source):
        if not record.tensors:
            raise CheckpointError(f"{source} holds no adapter tensors; there is nothing to load.")
        config = normalise_config(model, record.config)
        saved_modules, tensors, problems = _split_saved_modules(model, config, record.tensors)
        layers, extra = split_keys(model, config, tensors, keys)
        problems += value_problems(keys, layers, extra)
        _problems_raise(problems, model, source)
        first = next(iter(layers.values()))
        config = record.config_for_saved(config, {k: tuple(v.shape) for k, v in first.items()})
        meta = {k: v.to("meta") for k, v in extra.items()}
        shapes = expected_shapes(model, config, list(layers), _from_saved(record, config, meta))
        if shapes is not None:
            _problems_raise([p for n in layers for p in _compare(n, keys, shapes[n], layers[n])], model, source)
        with private_rng(model):
            slots = build_slots(model, config, list(layers), shared=_from_saved(record, config, extra))
        problems = [p for name, slot in slots.items()
                    for p in _compare(name, keys, {k: tuple(v.shape) for k, v in slot.params().items()}, layers[name])]
        _problems_raise(problems, model, source)
        with torch.no_grad():
            for name, slot in slots.items():
                for key, param in slot.params().items():
                    param.copy_(layers[name][key])
    return Fitted(config, slots, saved_modules)


