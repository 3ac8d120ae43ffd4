"""Adapter checkpoints in PEFT's folder layout (safetensors only; nothing is unpickled).

A folder holds ``adapter_config.json`` (PEFT's config fields plus ``peft_type``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.<param>``. PEFT's
``PeftModel.from_pretrained`` loads what :func:`save_adapter` writes and :func:`load_adapter`
loads what PEFT writes. diffadapt's own full config also rides in the safetensors metadata
(``diffadapt_config``) so nothing PEFT cannot express is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffadapt._version import __version__
from diffadapt.fitting import fit
from diffadapt.formats import peft
from diffadapt.methods import AdapterConfig, get_method
from diffadapt.model import adapter_state, check_adapter_name, hosts, install_slots, saved_module_hosts
from diffadapt.record import (  # noqa: F401  (the refusals and value checks, where the format readers import them)
    PREFIX,
    AdapterRecord,
    CheckpointConfigError,
    CheckpointError,
    refusing,
    tensor_key,
    value_problem,
)
from diffadapt.patterns import shorten

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WRITE_ID = "diffadapt_write_id"  # safetensors metadata: which write of a pipeline folder a part belongs to
MAX_JSON_BYTES = 16 << 20  # adapter_config.json / headers: far above any real config


def read_json(path: Path) -> Any:
    """A JSON file as Python values; CheckpointError naming the file if unreadable."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {size} bytes; an adapter config is at most {MAX_JSON_BYTES}.")
        with open(path, "rb") as f:
            return parse_json(f.read().decode("utf-8"), path)
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text (not a JSON config).") from None


def parse_json(text: str, source: object, field: str = "") -> Any:
    """``json.loads`` with errors as CheckpointError naming ``source`` (and the ``field`` it came from)."""
    where = f"{source}" + (f" ({field})" if field else "")
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: expected JSON text, got {type(text).__name__}.")
    if len(text) > MAX_JSON_BYTES:
        raise CheckpointError(f"{where}: {len(text)} characters of JSON; at most {MAX_JSON_BYTES}.")
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply.") from None
    except ValueError as exc:
        raise CheckpointError(f"{where} is not valid JSON ({exc}).") from None


def expect(value: Any, kind: Union[type, tuple], source: object, field: str) -> Any:
    """``value`` if it is a ``kind``, else CheckpointError naming ``source`` and ``field``."""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CheckpointError(f"{source}: {field} must be a {want}, got {type(value).__name__} {shorten(value, 60)}.")
    return value


def config_from_dict(data: Any, source: object, field: str = "config") -> AdapterConfig:
    """A diffadapt config dict (``to_dict``) from a file, checked (CheckpointError naming the file)."""
    expect(data, dict, source, field)
    method = expect(data.get("method"), str, source, f"{field}.method")
    with refusing(source):
        return get_method(method).config_class.from_dict(data)


# -- save ---------------------------------------------------------------------------------------
def peft_config_dict(config: AdapterConfig, base_model: Optional[str] = None) -> dict:
    out = peft.to_peft_dict(config)
    out.update(
        peft_type=peft.peft_type(config.method),
        task_type=None,
        base_model_name_or_path=base_model,
        revision=None,
        inference_mode=True,
    )
    return out


def peft_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (CPU, contiguous)."""
    config = adapter_state(model).configs[adapter_name]
    fmt = peft.format_of(config.method)
    out, specs, buffers = {}, [], []
    for name, host in hosts(model):
        slot = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if slot is None:
            continue
        specs.append(host.spec)
        buffers.append(slot.buffers_dict())
        for key, value in slot.params().items():
            out[f"{PREFIX}{name}.{fmt.keys[key]}"] = value.detach().cpu().contiguous()
    extra = fmt.extra_state(config, specs, buffers)
    out.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
    for name, host in saved_module_hosts(model):  # modules_to_save: PEFT drops "modules_to_save.<name>."
        if adapter_name in host.copies:
            for key, value in host.copies[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    return out


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Union[str, os.PathLike], metadata: dict[str, str]) -> Path:
    """``safetensors`` ``save_file`` into a temporary sibling, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_peft_files(
    folder: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor], base_model: Optional[str], write_id: Optional[str]
) -> None:
    config_json = peft_config_dict(config, base_model)  # refuses what PEFT cannot express, before writing
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "diffadapt_version": __version__,
        "diffadapt_config": json.dumps(config.to_dict()),
    }
    if write_id is not None:
        metadata[WRITE_ID] = write_id
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    with open(folder / CONFIG_NAME, "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)


def is_adapter_folder(path: Path) -> bool:
    """A folder holding nothing but a PEFT adapter's two files (one this library may replace)."""
    return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME}


def write_folder_atomic(
    folder: Union[str, os.PathLike],
    write: Callable[[Path], None],
    ours: Callable[[Path], bool],
    manifest: Optional[str] = None,
    stale: Callable[[Path], list[str]] = lambda folder: [],
) -> Path:
    """Write a folder with ``write(tmp)`` into a temporary sibling, then put it in place.

    A new folder is renamed into place (atomic). An existing one whose entries are all
    ``ours`` (adapter files the library wrote) is replaced whole, only once the new one is complete.
    An existing folder holding other files too (a training run's output folder) keeps them:
    the ``manifest`` file is removed first, each new entry replaces its old one, entries
    ``stale`` names (parts of the previous write the new one lacks) are removed, and the
    manifest goes in last, so a reader sees either no manifest or a complete, consistent folder.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or folder.is_symlink()):
        raise ValueError(f"{folder} exists and is not a folder; choose another path.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(folder, "tmp")
    try:
        write(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
            return folder
        if all(ours(entry) for entry in folder.iterdir()):
            old = _sibling(folder, "old")
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except OSError:
                os.rename(old, folder)  # the old folder back, as it was
                raise
            shutil.rmtree(old, ignore_errors=True)
            return folder
        gone = set(stale(folder)) - {e.name for e in tmp.iterdir()}
        if manifest is not None:
            (folder / manifest).unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == manifest):
            dst = folder / entry.name
            if entry.is_dir() and dst.exists() and is_adapter_folder(dst):
                old = _sibling(dst, "old")
                os.rename(dst, old)
                os.rename(entry, dst)
                shutil.rmtree(old, ignore_errors=True)
            elif entry.is_dir():
                if dst.is_symlink() or dst.exists() and not dst.is_dir():
                    raise ValueError(f"{dst} exists and is not a folder; cannot write the adapter there.")
                dst.mkdir(exist_ok=True)
                for part in entry.iterdir():  # a component folder holding the user's files too
                    os.replace(part, dst / part.name)
            else:
                os.replace(entry, dst)
        for name in gone:  # components of the previous write that the new one does not have
            if is_adapter_folder(folder / name):
                shutil.rmtree(folder / name, ignore_errors=True)
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_peft_folder(
    folder: Union[str, os.PathLike],
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    base_model: Optional[str] = None,
    write_id: Optional[str] = None,
) -> Path:
    """Write ``tensors`` (PEFT key names) and ``config`` as a PEFT adapter folder, atomically
    (see :func:`write_folder_atomic`; other files in an existing folder are kept)."""
    peft_config_dict(config, base_model)  # refuses what PEFT cannot express, before writing anything
    return write_folder_atomic(
        folder,
        lambda tmp: _write_peft_files(tmp, config, tensors, base_model, write_id),
        ours=lambda entry: entry.name in (CONFIG_NAME, WEIGHTS_NAME) and entry.is_file(),
    )


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


def read_safetensors_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    """Only the header metadata of a safetensors file (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def check_inside(root: Path, path: Path, what: str) -> None:
    """Refuse ``path`` (a part of the folder ``root``) if it resolves outside ``root`` (a symlink)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{path} ({what}) points outside {root}; refusing to follow it.")


def read_adapter(
    path: Union[str, os.PathLike], root: Optional[Path] = None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT-layout folder (or its safetensors file). With ``root`` (the
    pipeline folder it is part of) no file outside ``root`` is read."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_NAME if path.is_dir() else path
    config_file = folder / CONFIG_NAME
    if root is not None:
        check_inside(root, weights, "adapter weights")
        check_inside(root, config_file, "adapter config")
    if not weights.is_file():
        raise CheckpointError(f"No {WEIGHTS_NAME} in {folder} (diffadapt reads safetensors only, never .bin).")
    metadata, tensors = read_safetensors(weights)
    if not tensors:
        raise CheckpointError(f"{weights} holds no tensors; there is no adapter to load.")
    if "diffadapt_config" in metadata:
        config = config_from_dict(parse_json(metadata["diffadapt_config"], weights, "diffadapt_config"), weights,
                                  "diffadapt_config")
        if path.is_dir() and config_file.is_file():  # the folder's two parts must describe one adapter
            written = read_json(config_file)
            peft_type = written.get("peft_type") if isinstance(written, dict) else None
            if peft_type != peft.peft_type(config.method):
                raise CheckpointError(
                    f"{folder}: {CONFIG_NAME} says peft_type={shorten(peft_type, 40)} but {WEIGHTS_NAME} holds a "
                    f"{config.method} adapter; the folder's parts come from different writes. Save the adapter again."
                )
        return config, tensors
    if not config_file.is_file():
        raise CheckpointError(f"No {CONFIG_NAME} beside {weights}.")
    data = expect(read_json(config_file), dict, config_file, "the config")
    if "peft_type" not in data:
        raise CheckpointError(f"{config_file} has no 'peft_type'; it is not a PEFT adapter config.")
    expect(data["peft_type"], str, config_file, "peft_type")
    with refusing(config_file):
        method = peft.method_for_peft_type(data["peft_type"])
        if isinstance(data.get("target_modules"), str) and (data.get("layers_to_transform") or data.get("layers_pattern")):
            # PEFT's OFT / BOFT / FRoD accept this and ignore the layer filter (its HRA / FourierFT refuse it)
            warnings.warn(
                f"{config_file}: layers_to_transform / layers_pattern with a string target_modules; PEFT ignores "
                "the layer filter there, so diffadapt does too.",
                stacklevel=2,
            )
            data = {**data, "layers_to_transform": None, "layers_pattern": None}
        return peft.from_peft_dict(method.name, data), tensors


def peft_record(config: AdapterConfig, tensors: dict[str, torch.Tensor], source: object = "the file") -> AdapterRecord:
    """An adapter whose tensors carry PEFT's key names (PEFT folders, diffadapt files, LyCORIS files
    once converted), with its method's PEFT declaration (:mod:`diffadapt.formats.peft`)."""
    method, fmt = get_method(config.method), peft.format_of(config.method)
    return AdapterRecord(
        config, tensors, fmt.keys, fmt.config_for_saved,
        lambda cfg, specs, weights, saved: peft.shared_from_saved(method, cfg, specs, weights, saved), source,
    )


def load_adapter(
    model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default"
) -> AdapterConfig:
    """Load a PEFT-layout adapter (folder or safetensors file) as ``adapter_name`` and activate it.

    A file that does not fit raises CheckpointError and leaves the model as it was.
    """
    check_adapter_name(model, adapter_name)
    fitted = fit(model, peft_record(*read_adapter(path), source=path))
    install_slots(model, adapter_name, fitted.config, fitted.slots, fitted.saved_modules)
    return fitted.config
