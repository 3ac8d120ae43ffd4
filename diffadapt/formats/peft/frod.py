"""FRoD in PEFT's files: ``FrodConfig``, ``<path>.frod_lambda_l`` / ``.frod_lambda_s_values``, and
the shared bases ``base_model.frod_V.<key>``, ``.frod_s_indices.<key>``, ``.frod_s_size.<key>``.

``<key>`` is PEFT's category (:func:`diffadapt.methods.frod.peft_category`) when each category holds
one basis, else diffadapt's group key (``FRoD.group_key``: role and shape). A basis that spans
several categories (fast mode, ``mlp.0`` / ``mlp.2``) is written once per category as PEFT does,
each key its own copy, and loading shares it again. A file written with
``save_projection=False`` holds no bases: they are rebuilt from the weights with PEFT's recipe,
which is why a PEFT config reads as ``projection_mode="peft"``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from diffadapt.formats.peft import BOOKKEEPING, PeftFormat, sorted_lists
from diffadapt.methods import AdapterConfigError, LayerSpec
from diffadapt.methods.frod import FRoD, FRoDConfig, peft_category

_FIELDS = (
    "target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "init_weights", "fan_in_fan_out",
    "bias", "projection_prng_key", "save_projection", "frod_dropout", "sparse_rate", "regularization_alpha",
    "progressbar", "runtime_offload_base_weight",
)
_PROJECTIONS = (("base_model.frod_V.", "V"), ("base_model.frod_s_indices.", "indices"))
_SIZES = "base_model.frod_s_size."


def to_dict(config: FRoDConfig) -> dict[str, Any]:
    if config.overrides or config.exclude_modules:
        raise AdapterConfigError(
            f"FRoDConfig: PEFT's FrodConfig has no per-layer settings and no exclude_modules, so "
            f"overrides={config.overrides!r} / exclude_modules={config.exclude_modules!r} cannot be written in PEFT "
            "format. List the targets explicitly and drop the overrides, or save in diffadapt format."
        )
    return sorted_lists({k: getattr(config, k) for k in _FIELDS}, ("target_modules",))


def from_dict(data: dict[str, Any]) -> FRoDConfig:
    """Bookkeeping keys are ignored; ``runtime_offload_base_weight=True`` (a PEFT memory
    option with no effect on the math) is read as False; ``projection_mode="peft"`` so that a
    file without saved projections regenerates PEFT's V."""
    unknown = sorted(k for k in data if k not in _FIELDS and k not in BOOKKEEPING)
    if unknown:
        raise AdapterConfigError(f"FRoDConfig: PEFT config has fields diffadapt does not know: {unknown}.")
    kw = {k: data[k] for k in _FIELDS if k in data}
    kw["runtime_offload_base_weight"] = False
    kw["projection_mode"] = "peft"
    return FRoDConfig(**sorted_lists(kw, ("target_modules",)))


def _peft_keys_fit(layers: list[LayerSpec], same_basis: Callable[[int, int], bool]) -> bool:
    """PEFT's category names can key the projections if each category holds one basis."""
    first: dict[str, int] = {}
    for j, layer in enumerate(layers):
        k = first.setdefault(peft_category(layer.name), j)
        if not same_basis(k, j):
            return False
    return True


def extra_state(config: FRoDConfig, layers: list[LayerSpec], buffers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The bases under PEFT's names, unless ``save_projection`` is False."""
    if not config.save_projection:
        return {}
    if config.projection_mode == "fast":
        warnings.warn(
            "FRoD adapter saved with projection_mode='fast' (diffadapt's batched bases per role and shape): "
            "diffadapt loads it exactly, but PEFT computes U from a basis of its own and gives other outputs. "
            "For a file PEFT reproduces, create the adapter with FRoDConfig(projection_mode='peft') "
            "(train_dreambooth.py: --frod_projection_mode peft).",
            UserWarning,
            stacklevel=2,
        )
    if _peft_keys_fit(layers, lambda i, j: buffers[i]["V"] is buffers[j]["V"]):
        keys = [peft_category(layer.name) for layer in layers]
    else:  # PEFT would mix shapes or groups in one category: diffadapt's own group keys
        keys = [FRoD.group_key(layer) for layer in layers]
    out: dict[str, Tensor] = {}
    owner: dict[tuple, str] = {}  # storage -> the key that holds it
    for key, buf in zip(keys, buffers):
        d = buf["V"].shape[0]
        for prefix, field in _PROJECTIONS:
            out[f"{prefix}{key}"] = _own_copy(buf[field], key, owner)
        out[f"{_SIZES}{key}"] = torch.tensor([d, d], dtype=torch.long)
    return out


def _own_copy(t: Tensor, key: str, owner: dict[tuple, str]) -> Tensor:
    """``t``, or a copy of it where another key already holds its storage: a basis diffadapt shares
    across PEFT categories (one role and shape, e.g. ``mlp.0`` / ``mlp.2`` -> ``mlp_0`` / ``mlp_2``)
    is one tensor PEFT keeps once per category, and safetensors refuses keys that share memory."""
    storage = (t.device, t.untyped_storage().data_ptr())
    return t if owner.setdefault(storage, key) == key else t.clone()


def shared_from_projections(
    config: FRoDConfig,
    layers: list[LayerSpec],
    weights: list[Tensor],
    saved: dict[str, dict[str, Tensor]],
    keys: Optional[Sequence[str]] = None,
) -> list[dict[str, Tensor]]:
    """``FRoD.init_shared`` with V / pattern loaded instead of computed. ``saved`` maps a key to
    ``{"V": (d_in, d_in), "indices": (2, nnz)}`` (other entries, e.g. "size", are ignored);
    ``keys[j]`` is layer j's key (default ``FRoD.group_key``; pass
    ``[peft_category(l.name) for l in layers]`` for a PEFT file)."""
    keys = [FRoD.group_key(layer) for layer in layers] if keys is None else list(keys)
    built: dict[str, dict[str, Tensor]] = {}
    group_keys: dict[str, list[str]] = {}  # FRoD.group_key -> the saved keys its layers were built from
    bases = []
    for layer, w, k in zip(layers, weights, keys):
        config.check_layer(layer)
        if k not in saved:
            raise AdapterConfigError(
                f"FRoD: no saved projection {k!r} for {layer.describe()} (saved: {sorted(saved)}). Re-save the "
                "adapter with save_projection=True, or set save_projection=False to recompute V."
            )
        seen = group_keys.setdefault(FRoD.group_key(layer), [])
        if k not in built:
            same = next((s for s in seen if _same_projection(saved[s], saved[k])), None)
            if same is not None:  # one basis written once per PEFT category: shared again
                built[k] = built[same]
            else:
                idx = torch.as_tensor(saved[k]["indices"]).to(device=w.device, dtype=torch.long)
                built[k] = {"V": torch.as_tensor(saved[k]["V"]).to(device=w.device, dtype=w.dtype), "indices": idx}
        if k not in seen:
            seen.append(k)
        V, idx = built[k]["V"], built[k]["indices"]
        d = layer.fan_in
        idx_ok = idx.dim() == 2 and idx.shape[0] == 2 and (idx.numel() == 0 or 0 <= idx.min() <= idx.max() < d)
        if V.shape != (d, d) or not idx_ok:
            raise AdapterConfigError(
                f"FRoD: saved projection {k!r} (V {tuple(V.shape)}, indices {tuple(idx.shape)}) does not fit "
                f"{layer.describe()}: expected V ({d}, {d}) and indices (2, nnz) in [0, {d}). Check that the "
                "file belongs to this model."
            )
        bases.append(built[k])
    return FRoD.shared_from_bases(config, layers, weights, bases)


def _same_projection(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Two saved keys hold the same V and pattern (what :func:`extra_state` wrote for one basis)."""
    def same(x, y) -> bool:
        if x is None or y is None:
            return False
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
    return all(same(a.get(f), b.get(f)) for f in ("V", "indices"))


def shared_from_saved(
    config: FRoDConfig, layers: list[LayerSpec], weights: list[Tensor], saved: dict[str, Tensor]
) -> list[dict[str, Tensor]]:
    """Bases from a file's ``base_model.frod_*`` tensors; recomputed when the file was written with
    ``save_projection=False``."""
    projections: dict[str, dict[str, Tensor]] = {}
    for name, value in saved.items():
        for prefix, field in _PROJECTIONS:
            if name.startswith(prefix):
                projections.setdefault(name[len(prefix):], {})[field] = value
                break
        else:
            if not name.startswith(_SIZES):
                raise AdapterConfigError(f"FRoD: unexpected tensor {name!r} {tuple(value.shape)} in the file.")
    if not projections:
        if config.save_projection:
            raise AdapterConfigError(
                "FRoD: the file holds no projections (base_model.frod_V.*) but its config says "
                "save_projection=True; it is incomplete. Re-save it with save_projection=True."
            )
        return FRoD.init_shared(config, layers, weights)
    categories = [peft_category(layer.name) for layer in layers]
    keys = categories if all(k in projections for k in categories) else None  # None: group keys
    return shared_from_projections(config, layers, weights, projections, keys=keys)


FORMAT = PeftFormat(
    "FROD",
    {"frod_lambda_l": "frod_lambda_l", "frod_lambda_s_values": "frod_lambda_s_values"},
    to_dict,
    from_dict,
    extra_state=extra_state,
    shared_from_saved=shared_from_saved,
)
