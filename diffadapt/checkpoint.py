"""Adapter checkpoints in PEFT's folder layout (safetensors only; nothing is unpickled).

A folder holds ``adapter_config.json`` (PEFT's config fields plus ``peft_type``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.<param>``. PEFT's
``PeftModel.from_pretrained`` loads what :func:`save_adapter` writes and :func:`load_adapter`
loads what PEFT writes. diffadapt's own full config also rides in the safetensors metadata
(``diffadapt_config``) so nothing PEFT cannot express is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffadapt._version import __version__
from diffadapt.host import SUPPORTED_LAYERS, AdapterHost, AdapterSlot, SavedModuleHost
from diffadapt.formats import peft
from diffadapt.methods import AdapterConfig, AdapterConfigError, Method, get_method
from diffadapt.model import (
    check_adapter_name,
    _module,
    adapter_state,
    build_slots,
    hosts,
    install_slots,
    saved_module_hosts,
    select_saved_modules,
)
from diffadapt.patterns import shorten

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
WRITE_ID = "diffadapt_write_id"  # safetensors metadata: which write of a pipeline folder a part belongs to
MAX_JSON_BYTES = 16 << 20  # adapter_config.json / headers: far above any real config
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_LONG_WORD = re.compile(r"\S{200,}")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into, or is not readable. The
    message is always one line."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split())
        if len(text) > 1500:  # hostile values quoted in a message: keep their start
            text = _LONG_WORD.sub(lambda m: m.group(0)[:120] + f"...({len(m.group(0))} chars)", text)
        super().__init__(text)


class CheckpointConfigError(CheckpointError, AdapterConfigError):
    """A file whose adapter config is invalid, or does not fit this model's layers."""


@contextlib.contextmanager
def refusing(source: object) -> Iterator[None]:
    """Turn whatever a malformed file makes the code below raise into one-line CheckpointError
    naming ``source`` (the file): wrong types, missing keys, deep nesting, overflowing numbers."""
    where = str(source)
    try:
        yield
    except _OUT_OF_MEMORY:
        raise  # a real limit of this machine, not a property of the file
    except CheckpointError as exc:
        msg = str(exc)
        raise type(exc)(msg if where in msg else f"{where}: {msg}") from None
    except AdapterConfigError as exc:
        raise CheckpointConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: nested too deeply to be an adapter file.") from None
    except (KeyError, TypeError, AttributeError, IndexError, OverflowError, ValueError, RuntimeError) as exc:
        kind = {KeyError: "missing field", IndexError: "missing entry"}.get(type(exc), type(exc).__name__)
        detail = shorten(exc.args[0], 200) if isinstance(exc, KeyError) and exc.args else str(exc)[:300]
        raise CheckpointError(f"{where} is malformed ({kind}: {detail}); it is not an adapter diffadapt can load.") from None


def _key(key: object) -> str:
    """A tensor key for a message: as it is if short and printable, else its truncated repr."""
    if isinstance(key, str) and len(key) <= 200 and key.isprintable():
        return key
    return shorten(key, 200)


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
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module path: {param: tensor}}`` for layer tensors, plus the method's other tensors."""
    suffixes = {v: k for k, v in peft.keys(config.method).items()}
    known = _module_paths(model)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    extra, unknown, wrong = {}, [], []
    for key, value in tensors.items():
        body = key.removeprefix(PREFIX)
        hit = next((s for s in suffixes if body.endswith("." + s)), None)
        if hit is None:
            extra[key] = value
            continue
        path = normalise_path(body[: -len(hit) - 1], known)
        if path is None:
            unknown.append(f"{_key(key)} {tuple(value.shape)}")
            continue
        module = model.get_submodule(path)
        if not isinstance(module, (AdapterHost, *SUPPORTED_LAYERS)):
            wrong.append(f"{_key(key)} (a {type(module).__name__})")
            continue
        layers.setdefault(path, {})[suffixes[hit]] = value
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
            f"The file holds no {config.method} tensors ({', '.join(_key(k) for k in list(tensors)[:5])} ...)."
        )
    return layers, extra


def value_problem(key: str, value: torch.Tensor, want: Optional[torch.dtype] = None) -> Optional[str]:
    """Why ``value`` cannot be loaded (a non-float, or a NaN / inf that would give black images)."""
    if want is not None and not want.is_floating_point:
        return None if value.dtype == want else f"{_key(key)} is {value.dtype}, the module's is {want}"
    if value.dtype not in _FLOATS:
        return f"{_key(key)} is {value.dtype} (adapter values are float16/bfloat16/float32/float64)"
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        return f"{_key(key)} holds {bad} NaN/inf value(s) (a diverged training run?)"
    return None


def value_problems(
    method: str, layers: dict[str, dict[str, torch.Tensor]], extra: dict[str, torch.Tensor]
) -> list[str]:
    """Layer tensors must be finite floats; other tensors (FRoD's bases, indices) no complex/bool
    values and finite floats."""
    keys = peft.keys(method)
    problems = [p for name, values in layers.items() for k, v in values.items()
                for p in [value_problem(f"{PREFIX}{name}.{keys[k]}", v)] if p]
    for key, value in extra.items():
        if value.dtype.is_complex or value.dtype == torch.bool:
            problems.append(f"{_key(key)} is {value.dtype}")
        elif value.dtype.is_floating_point and value.numel() and not bool(torch.isfinite(value).all()):
            problems.append(f"{_key(key)} holds NaN/inf values")
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
        problems += [f"unexpected {PREFIX}{name}.{_key(k)}" for k in values if k not in expected]
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


def _from_saved(method: type[Method], config: AdapterConfig, saved: dict[str, torch.Tensor]) -> Callable:
    """``build_slots``' shared state from a file's non-layer tensors (:func:`peft.shared_from_saved`)."""
    return lambda specs, weights: peft.shared_from_saved(method, config, specs, weights, saved)


def expected_shapes(
    model: nn.Module, config: AdapterConfig, names: list[str], extra: dict[str, torch.Tensor]
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
        if not peft.has_shared_state(method):
            module = _module(model, n)
            weight = getattr(module, "weight", None)
            key = (type(module).__name__, tuple(weight.shape) if weight is not None else None, repr(config.for_layer(n)))
        rep_of[n] = key
        reps.setdefault(key, n)
    try:
        with private_rng(model):
            meta = {k: v.to("meta") for k, v in extra.items()}
            slots = build_slots(model, config, list(reps.values()), shared=_from_saved(method, config, meta), device="meta")
    except AdapterConfigError:
        raise
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" in str(exc).lower():
            return None
        raise
    shapes = {rep: {k: tuple(p.shape) for k, p in slots[rep].params().items()} for rep in reps.values()}
    return {n: shapes[reps[rep_of[n]]] for n in names}


def prepare_adapter(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: object = "the file"
) -> tuple[AdapterConfig, dict[str, AdapterSlot], dict[str, dict[str, torch.Tensor]]]:
    """Build the slots (and ``modules_to_save`` values) of a saved adapter for ``model`` and fill
    them, without touching the model (nor the global RNG).

    Every tensor is checked against the layer it belongs to before anything is allocated (shapes
    from slots built on the meta device): a mismatch raises CheckpointError naming the first
    offending keys and shapes. Non-float or non-finite values are refused, naming the key.
    """
    with refusing(source):
        if not tensors:
            raise CheckpointError(f"{source} holds no adapter tensors; there is nothing to load.")
        config = normalise_config(model, config)
        saved_modules, tensors, problems = _split_saved_modules(model, config, tensors)
        layers, extra = split_keys(model, config, tensors)
        method, fmt = get_method(config.method), peft.format_of(config.method)
        problems += value_problems(config.method, layers, extra)
        _problems_raise(problems, model, source)
        first = next(iter(layers.values()))
        config = fmt.config_for_saved(config, {k: tuple(v.shape) for k, v in first.items()})
        shapes = expected_shapes(model, config, list(layers), extra)
        if shapes is not None:
            _problems_raise([p for n in layers for p in _compare(n, fmt.keys, shapes[n], layers[n])], model, source)
        with private_rng(model):
            slots = build_slots(model, config, list(layers), shared=_from_saved(method, config, extra))
        problems = [p for name, slot in slots.items()
                    for p in _compare(name, fmt.keys, {k: tuple(v.shape) for k, v in slot.params().items()}, layers[name])]
        _problems_raise(problems, model, source)
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
    check_adapter_name(model, adapter_name)
    config, tensors = read_adapter(path)
    config, slots, saved_modules = prepare_adapter(model, config, tensors, path)
    install_slots(model, adapter_name, config, slots, saved_modules)
    return config
