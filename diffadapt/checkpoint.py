"""Adapter checkpoints in PEFT's folder layout (safetensors only; nothing is unpickled).

A folder holds ``adapter_config.json`` (PEFT's config fields plus ``peft_type``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.<param>``. PEFT's
``PeftModel.from_pretrained`` loads what :func:`save_adapter` writes and :func:`load_adapter`
loads what PEFT writes. diffadapt's own full config also rides in the safetensors metadata
(``diffadapt_config``) so nothing PEFT cannot express is lost.
"""

from __future__ import annotations

import json
import warnings
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffadapt._version import __version__
from diffadapt.methods import AdapterConfig, get_method, method_for_peft_type
from diffadapt.host import AdapterSlot, SavedModuleHost
from diffadapt.model import (
    _check_name,
    adapter_state,
    build_slots,
    hosts,
    install_slots,
    saved_module_hosts,
    select_saved_modules,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into, or is not readable."""


# -- save ---------------------------------------------------------------------------------------
def peft_config_dict(config: AdapterConfig, base_model: Optional[str] = None) -> dict:
    out = config.to_peft_dict()
    out.update(
        peft_type=config.peft_type,
        task_type=None,
        base_model_name_or_path=base_model,
        revision=None,
        inference_mode=True,
    )
    return out


def peft_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (CPU, contiguous)."""
    config = adapter_state(model).configs[adapter_name]
    method = get_method(config.method)
    out, specs, buffers = {}, [], []
    for name, host in hosts(model):
        slot = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if slot is None:
            continue
        specs.append(host.spec)
        buffers.append(slot.buffers_dict())
        for key, value in slot.params().items():
            out[f"{PREFIX}{name}.{method.peft_keys[key]}"] = value.detach().cpu().contiguous()
    extra = method.peft_extra_state(config, specs, buffers)
    out.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
    for name, host in saved_module_hosts(model):  # modules_to_save: PEFT drops "modules_to_save.<name>."
        if adapter_name in host.copies:
            for key, value in host.copies[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    return out


def write_peft_folder(
    folder: Union[str, os.PathLike], config: AdapterConfig, tensors: dict[str, torch.Tensor], base_model: Optional[str] = None
) -> Path:
    """Write ``tensors`` (PEFT key names) and ``config`` as a PEFT adapter folder."""
    config_json = peft_config_dict(config, base_model)  # refuses what PEFT cannot express, before writing
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "diffadapt_version": __version__,
        "diffadapt_config": json.dumps(config.to_dict()),
    }
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    with open(folder / CONFIG_NAME, "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
    return folder


def save_adapter(
    model: nn.Module, save_directory: Union[str, os.PathLike], adapter_name: str = "default", base_model: Optional[str] = None
) -> Path:
    """Write one adapter of ``model`` as a PEFT folder; returns the folder."""
    config = adapter_state(model).configs.get(adapter_name)
    if config is None:
        raise ValueError(f"No adapter named {adapter_name!r}; this model has {sorted(adapter_state(model).configs)}.")
    return write_peft_folder(save_directory, config, peft_state_dict(model, adapter_name), base_model)


# -- load ---------------------------------------------------------------------------------------
def read_safetensors(path: Union[str, os.PathLike]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and tensors of a safetensors file (CheckpointError if unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def read_adapter(path: Union[str, os.PathLike]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT-layout folder (or its safetensors file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"No {WEIGHTS_NAME} in {folder} (diffadapt reads safetensors only, never .bin).")
    metadata, tensors = read_safetensors(weights)
    if "diffadapt_config" in metadata:
        data = json.loads(metadata["diffadapt_config"])
        return get_method(data["method"]).config_class.from_dict(data), tensors
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"No {CONFIG_NAME} beside {weights}.")
    with open(config_file) as f:
        data = json.load(f)
    if "peft_type" not in data:
        raise CheckpointError(f"{config_file} has no 'peft_type'; it is not a PEFT adapter config.")
    method = method_for_peft_type(data["peft_type"])
    if isinstance(data.get("target_modules"), str) and (data.get("layers_to_transform") or data.get("layers_pattern")):
        # PEFT's OFT / BOFT / FRoD accept this and ignore the layer filter (its HRA / FourierFT refuse it)
        warnings.warn(
            f"{config_file}: layers_to_transform / layers_pattern with a string target_modules; PEFT ignores "
            "the layer filter there, so diffadapt does too."
        )
        data = {**data, "layers_to_transform": None, "layers_pattern": None}
    return method.config_class.from_peft_dict(data), tensors


def _module_paths(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules()}


def normalise_path(path: str, known: set[str]) -> Optional[str]:
    """Map a module path from a file onto this model (``text_model.`` differs across transformers)."""
    if path in known:
        return path
    for alt in (path.removeprefix("text_model."), "text_model." + path):
        if alt in known:
            return alt
    return None


def split_keys(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module path: {param: tensor}}`` for layer tensors, plus the method's other tensors."""
    method = get_method(config.method)
    suffixes = {v: k for k, v in method.peft_keys.items()}
    known = _module_paths(model)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    extra, unknown = {}, []
    for key, value in tensors.items():
        body = key.removeprefix(PREFIX)
        hit = next((s for s in suffixes if body.endswith("." + s)), None)
        if hit is None:
            extra[key] = value
            continue
        path = normalise_path(body[: -len(hit) - 1], known)
        if path is None:
            unknown.append(f"{key} {tuple(value.shape)}")
            continue
        layers.setdefault(path, {})[suffixes[hit]] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} adapter tensors name modules this {type(model).__name__} does not have "
            f"(a file for another architecture?): {', '.join(unknown[:5])}"
        )
    if not layers:
        raise CheckpointError(f"The file holds no {config.method} tensors ({', '.join(list(tensors)[:5])} ...).")
    return layers, extra


def _split_saved_modules(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list[str]]:
    """Take the ``modules_to_save`` tensors out of ``tensors``; check them against the modules."""
    saved = {n: {} for n in select_saved_modules(model, config)}
    rest = {}
    for key, value in tensors.items():
        body = key.removeprefix(PREFIX)
        owner = next((n for n in saved if body.startswith(n + ".")), None)
        if owner is None:
            rest[key] = value
        else:
            saved[owner][body[len(owner) + 1 :]] = value
    problems = []
    for name, values in saved.items():
        module = model.get_submodule(name)
        expected = (module.original_module if isinstance(module, SavedModuleHost) else module).state_dict()
        problems += [f"missing {PREFIX}{name}.{k}" for k in expected if k not in values]
        problems += [f"unexpected {PREFIX}{name}.{k}" for k in values if k not in expected]
        problems += [
            f"{PREFIX}{name}.{k}: file {tuple(v.shape)} vs module {tuple(expected[k].shape)}"
            for k, v in values.items()
            if k in expected and v.shape != expected[k].shape
        ]
    return saved, rest, problems


def prepare_adapter(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: object = "the file"
) -> tuple[AdapterConfig, dict[str, AdapterSlot], dict[str, dict[str, torch.Tensor]]]:
    """Build the slots (and ``modules_to_save`` values) of a saved adapter for ``model`` and fill
    them, without touching the model.

    Every tensor is checked against the layer it belongs to: a mismatch raises CheckpointError
    naming the first offending keys and shapes.
    """
    saved_modules, tensors, problems = _split_saved_modules(model, config, tensors)
    layers, extra = split_keys(model, config, tensors)
    method = get_method(config.method)
    first = next(iter(layers.values()))
    config = method.config_for_saved(config, {k: tuple(v.shape) for k, v in first.items()})
    slots = build_slots(model, config, list(layers), saved_shared=extra)
    for name, slot in slots.items():
        values = layers[name]
        for key, param in slot.params().items():
            if key not in values:
                problems.append(f"missing {PREFIX}{name}.{method.peft_keys[key]} {tuple(param.shape)}")
            elif values[key].shape != param.shape:
                problems.append(
                    f"{PREFIX}{name}.{method.peft_keys[key]}: file {tuple(values[key].shape)} vs layer {tuple(param.shape)}"
                )
        problems += [f"unexpected {name}.{k}" for k in values if k not in slot.param_names]
    if problems:
        raise CheckpointError(
            f"Adapter in {source} does not fit this {type(model).__name__}: " + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    with torch.no_grad():
        for name, slot in slots.items():
            for key, param in slot.params().items():
                param.copy_(layers[name][key])
    return config, slots, saved_modules


def load_adapter(
    model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default"
) -> AdapterConfig:
    """Load a PEFT-layout adapter (folder or safetensors file) as ``adapter_name`` and activate it.

    A file that does not fit raises CheckpointError and leaves the model as it was.
    """
    _check_name(model, adapter_name)
    config, tensors = read_adapter(path)
    config, slots, saved_modules = prepare_adapter(model, config, tensors, path)
    install_slots(model, adapter_name, config, slots, saved_modules)
    return config
