"""Adapters on whole diffusers pipelines: one artifact for every adapted component, and the
generation-time verbs (load, set_adapters, merge, ...) for a pipeline or a single model.

Every verb here takes either a model (UNet, transformer, text encoder) or a pipeline; for a
pipeline it acts on each component that has adapters, found structurally in ``pipe.components``
(every ``nn.Module``, whatever its name: ``unet``/``transformer``, ``text_encoder`` ...
``text_encoder_4``, ``controlnet``; CLIP, T5, Qwen2.5-VL, Qwen3, Gemma 2, Mistral 3 or Llama
text encoders alike). Tested on SD1.5/SDXL/SD3/SD3.5/Flux/Flux.2/PixArt/Qwen-Image/Z-Image/
Sana/Lumina 2/Chroma/HiDream pipelines.

The artifact's formats (diffadapt's own file and folder, PEFT folders, LyCORIS / kohya / ComfyUI
files) are read and written in :mod:`diffadapt.formats.pipeline_file` and the modules it names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from diffadapt import checkpoint, model as mdl
from diffadapt._version import __version__
from diffadapt.checkpoint import CheckpointError
from diffadapt.artifact import DENOISERS, ComponentAdapter, PipelineAdapter, components, denoiser  # noqa: F401  (re-exported)
from diffadapt.fitting import fit, normalise_config, split_keys, value_problems
from diffadapt.formats import lycoris, lycoris_export, peft
from diffadapt.formats.pipeline_file import (  # noqa: F401  (re-exported: the artifact's readers and writers)
    FORMAT,
    META_NAME,
    check_component,
    read_pipeline_adapter,
    write_pipeline_adapter,
    write_pipeline_folder,
)

logger = logging.getLogger(__name__)


def adapted(obj: Any) -> dict[str, nn.Module]:
    found = {n: m for n, m in components(obj).items() if mdl.has_adapters(m)}
    if not found:
        raise ValueError(f"This {type(obj).__name__} has no diffadapt adapters; load or add one first.")
    return found


def _all_names(obj: Any) -> list[str]:
    return sorted({n for m in adapted(obj).values() for n in mdl.adapter_state(m).configs})


# -- save -------------------------------------------------------------------------------------------
def save_adapter(
    obj: Any,
    path: Union[str, os.PathLike],
    adapter_name: str = "default",
    metadata: Optional[dict[str, Any]] = None,
) -> Path:
    """Save ``adapter_name``: a PEFT folder for a model; for a pipeline a folder, or one file if
    ``path`` ends in ``.safetensors``. ``metadata`` (base_model, instance_prompt, ...) is stored."""
    if isinstance(obj, nn.Module):
        return checkpoint.save_adapter(mdl.unwrap(obj), path, adapter_name, (metadata or {}).get("base_model"))
    parts = {n: m for n, m in adapted(obj).items() if adapter_name in mdl.adapter_state(m).configs}
    if not parts:
        raise ValueError(f"No component has an adapter named {adapter_name!r}; adapters: {_all_names(obj)}.")
    configs = {n: mdl.adapter_state(m).configs[adapter_name] for n, m in parts.items()}
    adapter = PipelineAdapter(
        components={
            n: ComponentAdapter(configs[n], checkpoint.peft_state_dict(m, adapter_name), type(m).__name__)
            for n, m in parts.items()
        },
        metadata={
            "method": next(iter(configs.values())).method,
            "diffadapt_version": __version__,
            "pipeline_class": type(obj).__name__,
            **(metadata or {}),
        },
    )
    return write_pipeline_adapter(adapter, path)


# -- load --------------------------------------------------------------------------------------------
def load_adapter(
    obj: Any,
    path: Union[str, os.PathLike, PipelineAdapter],
    adapter_name: str = "default",
    component: Optional[str] = None,
) -> PipelineAdapter:
    """Load an adapter (a path, or an already read PipelineAdapter) into a model or pipeline and
    make it the active one.

    A plain PEFT folder goes into ``component`` (default: the pipeline's denoiser, see
    :func:`diffadapt.artifact.denoiser`).
    Everything is checked before anything changes: a file for another architecture, missing
    components, or tensors that do not fit raise CheckpointError and leave the pipeline as it was.
    """
    saved = path if isinstance(path, PipelineAdapter) else read_pipeline_adapter(path, component, target=obj)
    if not saved.parts():
        raise CheckpointError(f"{path} holds no adapter components; there is nothing to load.")
    mods = components(obj)
    saved = _placed(saved, obj, mods, component, path)
    parts = {"": saved.unplaced} if saved.unplaced is not None else saved.components  # "": a bare model
    for n, part in parts.items():
        where = f"component {n!r}" if n else "the model"
        if part.model_class is not None and part.model_class != type(mods[n]).__name__:
            raise CheckpointError(
                f"{path} was made for a {part.model_class} as {where}; this pipeline's is a {type(mods[n]).__name__}."
            )
        mdl.check_adapter_name(mods[n], adapter_name)
    fitted = {  # every component fitted before any is installed
        n: fit(mods[n], checkpoint.peft_record(part.config, part.tensors, path)) for n, part in parts.items()
    }
    for n, f in fitted.items():
        mdl.install_slots(mods[n], adapter_name, f.config, f.slots, f.saved_modules)
    logger.info("loaded adapter %r into %s", adapter_name, ", ".join(n or type(obj).__name__ for n in fitted))
    # components without this adapter keep running their own active adapters
    return saved


def _placed(
    saved: PipelineAdapter, obj: Any, mods: dict[str, nn.Module], component: Optional[str], path: object
) -> PipelineAdapter:
    """``saved`` as it goes into ``obj``: an unplaced part on ``component`` (default: the denoiser);
    for a bare model (``mods == {"": model}``) the one part it takes, still unplaced. Refuses parts
    for components ``obj`` does not have."""
    if "" in mods:  # a bare model takes one part
        if saved.unplaced is not None:
            return saved
        wanted = component or next((n for n, c in saved.classes.items() if c == type(obj).__name__), None)
        if wanted not in saved.components:
            raise CheckpointError(
                f"{path} holds adapters for {sorted(saved.classes)} ({saved.classes}); none is a {type(obj).__name__}."
            )
        return PipelineAdapter({}, dict(saved.metadata), unplaced=saved.components[wanted])
    if saved.unplaced is not None:  # a PEFT folder into a pipeline
        target = component or denoiser(mods)
        if target is None:
            raise CheckpointError(f"Say which component {path} is for (component=...); {sorted(mods)}.")
        saved = saved.placed(target)
    missing = [n for n in saved.components if n not in mods]
    if missing:
        raise CheckpointError(
            f"{path} has adapters for {', '.join(map(repr, missing))}, which this {type(obj).__name__} does "
            f"not have (it has {sorted(mods)}); the file was made for another architecture."
        )
    return saved


def hotswap_adapter(obj: Any, path: Union[str, os.PathLike], adapter_name: str = "default") -> None:
    """Replace the weights of loaded ``adapter_name`` in place by those in ``path``.

    The file must hold the same method with the same structure (config and shapes): no module,
    buffer or parameter object changes, so a ``torch.compile``d model does not recompile.
    """
    saved = read_pipeline_adapter(path, target=obj)
    mods = adapted(obj)
    if isinstance(obj, nn.Module):  # a bare model: the unplaced part, else the first
        parts = {"": saved.unplaced or next(iter(saved.components.values()))}
    else:
        parts = saved.placed(denoiser(components(obj)) or "unet").components
    plans = []
    for n, (config, tensors) in parts.items():
        model = mods.get(n)
        old = mdl.adapter_config(model, adapter_name) if model is not None else None
        if old is None:
            raise CheckpointError(f"Component {n or 'model'!r} has no loaded adapter {adapter_name!r} to swap.")
        if old.modules_to_save:
            raise CheckpointError(f"{adapter_name!r} has modules_to_save; hot-swap covers adapter weights only.")
        with checkpoint.refusing(path):
            config = normalise_config(model, config)
            mine, theirs = old.to_dict(), config.to_dict()
            differ = sorted(k for k in mine if mine[k] != theirs.get(k))
            if differ:
                raise CheckpointError(
                    f"{path} cannot be hot-swapped into {adapter_name!r}: its config differs in {differ}. "
                    "Load it as another adapter instead."
                )
            keys = peft.keys(config.method)
            layers, extra = split_keys(model, config, tensors, keys)
            problems = value_problems(keys, layers, extra)
            if problems:
                raise CheckpointError(f"{path} cannot be hot-swapped into {adapter_name!r}: " + "; ".join(problems[:5]))
            params = mdl.adapter_parameters(model, adapter_name)
            wanted = {f"{p}.{k}" for p, values in layers.items() for k in values}
            if wanted != set(params):
                raise CheckpointError(f"{path} adapts other layers than the loaded {adapter_name!r}; load it instead.")
            for p, values in layers.items():
                for k, v in values.items():
                    if v.shape != params[f"{p}.{k}"].shape:
                        raise CheckpointError(
                            f"{p}.{k}: file {tuple(v.shape)} vs loaded {tuple(params[f'{p}.{k}'].shape)}."
                        )
        plans.append((model, params, layers))
    for model, params, layers in plans:
        with torch.no_grad():
            for p, values in layers.items():
                for k, v in values.items():
                    params[f"{p}.{k}"].copy_(v)
        mdl.refresh_merged(model)  # merged weights follow the new values; the same adapters stay merged


# -- verbs for a model or a pipeline -----------------------------------------------------------------
def set_adapters(
    obj: Any,
    adapter_names: Union[str, Sequence[str]],
    weights: Union[float, Sequence[float], None] = None,
    order: str = "diffadapt",
) -> None:
    """Activate adapters (activation order) with strengths, on every component that has them
    (``order="peft"``: the names in PEFT's order, see :func:`diffadapt.model.set_adapters`)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"Got {len(weights)} strengths for {len(names)} adapters {names}.")
    known = _all_names(obj)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {known}.")
    for m in adapted(obj).values():
        have = mdl.adapter_state(m).configs
        pairs = [(n, w) for n, w in zip(names, weights) if n in have]
        mdl.set_adapters(m, [n for n, _ in pairs], [w for _, w in pairs], order=order)


def set_adapter_strength(obj: Any, adapter_name: str, strength: float) -> None:
    """Change one active adapter's strength on every component that runs it."""
    models = [m for m in adapted(obj).values() if adapter_name in [n for n, _ in mdl.adapter_state(m).order]]
    if not models:
        known = _all_names(obj)
        why = "is not active" if adapter_name in known else "is not loaded"
        raise ValueError(f"Adapter {adapter_name!r} {why}; loaded: {known}, active: {[n for n, _ in active_adapters(obj)]}.")
    mdl.check_strengths([adapter_name], [strength])
    for m in models:
        mdl.set_adapter_strength(m, adapter_name, strength)


def active_adapters(obj: Any) -> list[tuple[str, float]]:
    seen: dict[str, float] = {}
    for m in adapted(obj).values():
        seen.update(mdl.active_adapters(m))
    return list(seen.items())


def list_adapters(obj: Any) -> dict[str, dict]:
    """adapter -> {component -> method, layers, parameters, strength}."""
    out: dict[str, dict] = {}
    for c, m in adapted(obj).items():
        for n, info in mdl.list_adapters(m).items():
            out.setdefault(n, {})[c or "model"] = info
    return out


def _each(verb):
    def run(obj: Any, *args, **kwargs) -> None:
        for m in adapted(obj).values():
            verb(m, *args, **kwargs)

    run.__name__ = verb.__name__
    run.__doc__ = verb.__doc__
    return run


enable_adapters = _each(mdl.enable_adapters)
disable_adapters = _each(mdl.disable_adapters)
unmerge_adapters = _each(mdl.unmerge_adapters)
set_keep_eval_weights = _each(mdl.set_keep_eval_weights)


def merge_adapters(obj: Any, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Bake the active adapters (or the chosen ones) into every adapted component's weights."""
    if adapter_names is not None:
        unknown = [n for n in adapter_names if n not in _all_names(obj)]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {_all_names(obj)}.")
    for m in adapted(obj).values():
        have = mdl.adapter_state(m).configs
        chosen = None if adapter_names is None else [n for n in adapter_names if n in have]
        mdl.merge_adapters(m, chosen)


def delete_adapter(obj: Any, adapter_name: str) -> None:
    if adapter_name not in _all_names(obj):
        raise ValueError(f"Unknown adapter {adapter_name!r}; loaded: {_all_names(obj)}.")
    for m in adapted(obj).values():
        if adapter_name in mdl.adapter_state(m).configs:
            mdl.delete_adapter(m, adapter_name)


def unload(obj: Any) -> Any:
    """Remove every adapter from the model / every component: original modules, bit-exact."""
    for m in components(obj).values():
        if mdl.has_adapters(m):
            mdl.unload(m)
    return obj


def load_lycoris(obj: Any, path: Union[str, os.PathLike], adapter_name: str = "default", lycoris_component: Optional[str] = None):
    """Load a LyCORIS / kohya / ComfyUI OFT or BOFT file into a pipeline or model as a diffadapt
    adapter (every verb works on it). Same as ``load_adapter``, plus the component that
    ``lycoris_``-prefixed keys belong to (default: the denoiser)."""
    return load_adapter(obj, lycoris.read_lycoris(path, obj, lycoris_component), adapter_name)


def export_lycoris(adapter: PipelineAdapter, path: Union[str, os.PathLike], pipe: Any = None, **kwargs) -> dict[str, Any]:
    """Write a saved adapter as a LyCORIS file. With ``pipe`` (the base pipeline or model) it is
    loaded there under a temporary name, exported and removed again (needed for ``.diff`` /
    LoRA); without, only output-side OFT/BOFT can be written. Returns the export report."""
    if pipe is None:
        return lycoris_export.write_lycoris_file(adapter, path, **kwargs)
    before = {n: mdl.active_adapters(m) for n, m in components(pipe).items() if mdl.has_adapters(m)}
    name = "diffadapt_lycoris_export"
    load_adapter(pipe, adapter, name)
    try:
        return lycoris_export.save_lycoris(pipe, path, name, **kwargs)
    finally:
        delete_adapter(pipe, name)
        for n, active in before.items():  # loading made the export adapter the only active one
            model = components(pipe)[n]
            if active and mdl.has_adapters(model):
                mdl.set_adapters(model, [a for a, _ in active], [s for _, s in active])
