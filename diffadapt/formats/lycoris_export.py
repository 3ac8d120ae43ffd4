"""Export to LyCORIS / kohya / ComfyUI files: every diffadapt method (the format and the
mapping are described in :mod:`diffadapt.formats.lycoris`, which reads them).

Output-side OFT / BOFT go out as ``oft_blocks`` (``Q / 2``: a round trip keeps ``Q`` bit for bit;
a constraint some UI would apply differently is baked in and ``alpha`` written as 0); input-side
rotations (PEFT's convention) as ``.diff``; HRA as an exact LoRA (``W Q = W - (W V) Y^T``);
FourierFT and FRoD as ``.diff`` or, with ``lora_rank``, as a truncated-SVD LoRA whose error is
reported.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file
from torch import Tensor

from diffadapt import model as mdl
from diffadapt._version import __version__
from diffadapt.artifact import PipelineAdapter, components
from diffadapt.checkpoint import PREFIX, CheckpointError
from diffadapt.host import AdapterHost
from diffadapt.methods import AdapterConfig, get_method
from diffadapt.methods.boft import BOFT
from diffadapt.methods.hra import HRA
from diffadapt.methods.oft import OFT
from diffadapt.formats import names
from diffadapt.formats.lycoris import half_chunk_order

EXPORT_FORMAT = "diffadapt.lycoris-export"


@dataclass
class _Source:
    """What export needs of one adapted layer."""

    component: str
    path: str
    method: type
    config: AdapterConfig  # this layer's config (overrides applied)
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    out_features: int
    weight_shape: Optional[tuple[int, ...]]  # the module's weight shape (None: unknown without a model)
    kind: Optional[str]
    host: Optional[AdapterHost] = None
    adapter_name: str = ""


def _prefix(component: str, classes: dict[str, Optional[str]]) -> str:
    """kohya's prefixes for SD UNets and text encoders, LyCORIS' ``lycoris_`` for DiTs."""
    cls = classes.get(component) or ""
    if component == "":
        if cls.startswith(("CLIPText", "T5")):
            return "lora_te_"
        return "lora_unet_" if cls == "UNet2DConditionModel" else "lycoris_"
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if "text_encoder_2" in classes else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te3_" if cls.startswith("T5") else "lora_te2_"
    if component == "text_encoder_3":
        return "lora_te3_"
    if component == "transformer":
        return "lycoris_"
    raise CheckpointError(f"No community key prefix is known for component {component!r}; export the denoiser and text encoders only.")


def _rotation_tensors(src: _Source, notes: Counter) -> dict[str, Tensor]:
    """Output-side OFT/BOFT -> ``oft_blocks`` (+ ``rescale``) and ``alpha``, exactly."""
    config = src.config
    skew = src.method.skew(config, src.params, src.buffers).detach().float()  # constraint applied
    scale = None
    if src.method is OFT:
        skew = skew.expand(src.out_features // skew.shape[-1], -1, -1) if config.block_share else skew
        blocks = skew / 2  # Q = A - A^T = S
    else:
        s = src.params["boft_s"].detach().float().reshape(-1)
        scale = None if bool((s == 1).all()) else s
        if skew.shape[0] == 1 and scale is None:
            blocks = skew[0] / 2  # one factor, natural order: diag-oft
        else:
            back = torch.argsort(half_chunk_order(skew.shape[-1]))
            blocks = (-skew / 2)[..., back, :][..., :, back]  # Q = -S in LyCORIS' interleaved order
            n = blocks.shape[1]
            full = n.bit_length() if n & (n - 1) == 0 else 0  # LyCORIS' own loader wants log2(N) + 1 factors
            if full > blocks.shape[0]:  # identity factors (A = 0) after ours change nothing
                blocks = torch.cat([blocks, blocks.new_zeros(full - blocks.shape[0], *blocks.shape[1:])])
                notes["BOFT padded with identity factors to LyCORIS' log2(N)+1"] += 1
            elif not full:
                notes["BOFT block count not a power of two: ComfyUI reads it, LyCORIS' own loader does not"] += 1
    if blocks.dim() == 3 and blocks.shape[-1] > blocks.shape[0]:
        notes["OFT block size > block count: ComfyUI reads it, LyCORIS' own loader does not"] += 1
    norm = float(torch.linalg.vector_norm(blocks - blocks.mT))
    alpha = float(config.constraint)
    if alpha and norm + 1e-8 > alpha:  # ComfyUI clamps to alpha, LyCORIS to alpha * out: bake it
        notes["constraint baked into the blocks (ComfyUI and LyCORIS read alpha differently)"] += 1
        alpha = 0.0
    if not alpha:
        # every consumer reads alpha as a norm limit on Q = A - A^T: ComfyUI as the limit itself,
        # LyCORIS / A1111 / kohya as alpha * out_features, and A1111 / kohya clamp to it even at 0
        # (the rotation would vanish). A limit of at least twice the norm binds nowhere.
        alpha = max(1.0, 2.0 * norm)
    out = {"oft_blocks": blocks.contiguous(), "alpha": torch.tensor(alpha)}
    if scale is not None:
        ndim = len(src.weight_shape) if src.weight_shape is not None else (4 if src.kind == "conv2d" else 2)
        out["rescale"] = scale.reshape(-1, *[1] * (ndim - 1)).contiguous()
    return out


def _base_weight(src: _Source) -> Tensor:
    """The layer's original 2-D weight (before any merge), float64."""
    w = src.host.base_weight().detach()
    w = w.T if src.kind == "conv1d" else w.flatten(1)
    return w.to(torch.float64)


def _as_module_layout(w2d: Tensor, src: _Source) -> Tensor:
    if src.kind == "conv1d":
        return w2d.T.contiguous()
    return w2d.reshape(src.weight_shape).contiguous()


def _hra_lora(src: _Source) -> dict[str, Tensor]:
    """HRA as an exact LoRA for this base weight: ``W Q - W = (-W V) Y^T``, alpha = rank."""
    prep = HRA.prepare(src.config, src.params, src.buffers, 1.0)
    w = _base_weight(src)
    up = -(w @ prep.v.to(w.dtype))  # (out, r)
    down = prep.y.to(w.dtype).mT  # (r, fan_in)
    return _lora_tensors(up, down, src)


def _lora_tensors(up: Tensor, down: Tensor, src: _Source) -> dict[str, Tensor]:
    rank = up.shape[1]
    if src.kind == "conv2d":
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, *src.weight_shape[1:])
    return {
        "lora_up.weight": up.float().contiguous(),
        "lora_down.weight": down.float().contiguous(),
        "alpha": torch.tensor(float(rank)),
    }


def _delta(src: _Source) -> Tensor:
    """``W_eff - W`` of this adapter alone at strength 1 (float64, 2-D)."""
    w = _base_weight(src)
    slot = src.host.adapters[src.adapter_name]
    return slot.method.apply_to_weight(w, slot.prepare(1.0, False)) - w


def _layer_tensors(
    src: _Source, rotations: str, lora_rank: Optional[int], notes: Counter, errors: list[float]
) -> tuple[str, dict[str, Tensor]]:
    """(kind written, tensors by suffix) for one layer."""
    config = src.config
    rotation = src.method in (OFT, BOFT)
    exact_blocks = rotation and config.rotation_side == "output" and not getattr(config, "use_cayley_neumann", False)
    if rotation and rotations == "blocks" and not exact_blocks:
        why = (
            "it uses the Cayley-Neumann series (use_cayley_neumann=True) where LyCORIS uses exact Cayley"
            if config.rotation_side == "output"
            else "it rotates the layer input (PEFT's convention, W R^T) and LyCORIS/ComfyUI rotate the output (R W)"
        )
        raise CheckpointError(
            f"{src.component or 'model'}.{src.path}: this {config.method.upper()} adapter cannot be written as "
            f"oft_blocks: {why}. Export it as .diff (rotations='diff' or 'auto'), or train with "
            "rotation_side='output' for an exact LyCORIS file."
        )
    if exact_blocks and rotations != "diff":
        return "oft_blocks", _rotation_tensors(src, notes)
    if rotation and rotations == "auto":
        side = "output side, Cayley-Neumann" if config.rotation_side == "output" else "input side"
        notes[f"{config.method.upper()} ({side}) has no oft_blocks form: written as .diff / LoRA"] += 1
    if src.host is None:
        raise CheckpointError(
            f"{src.component or 'model'}.{src.path}: exporting {config.method} "
            f"{'(input side) ' if rotation else ''}needs the base model's weights (.diff / LoRA); pass the model (--model)."
        )
    if src.method is HRA and rotations != "diff":
        return "lora", _hra_lora(src)
    delta = _delta(src)
    if lora_rank:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(lora_rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        errors.append(float(torch.linalg.vector_norm(delta - up @ down) / torch.linalg.vector_norm(delta).clamp_min(1e-30)))
        return "lora", _lora_tensors(up, down, src)
    return "diff", {"diff": _as_module_layout(delta, src).float()}


def _live_sources(obj: Any, adapter_name: str) -> list[_Source]:
    out = []
    for component, model in components(obj).items():
        state = model.__dict__.get("_diffadapt")
        if state is None or adapter_name not in state.configs:
            continue
        for path, host in mdl.hosts(model):
            if adapter_name not in host.adapters:
                continue
            slot = host.adapters[adapter_name]
            out.append(_Source(
                component, path, slot.method, slot.config, slot.params(), slot.buffers_dict(),
                host.spec.out_features, tuple(host.base_layer.weight.shape), host.spec.kind, host, adapter_name,
            ))
    if not out:
        raise ValueError(f"No component of this {type(obj).__name__} has an adapter named {adapter_name!r}.")
    return out


def _file_sources(adapter) -> list[_Source]:
    """Sources from a saved adapter without a model: enough for output-side OFT/BOFT only."""
    out = []
    for component, (config, tensors) in adapter.components.items():
        method = get_method(config.method)
        suffixes = {v: k for k, v in method.peft_keys.items()}
        layers: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            body = key.removeprefix(PREFIX)
            hit = next((s for s in suffixes if body.endswith("." + s)), None)
            if hit is not None:
                layers.setdefault(body[: -len(hit) - 1], {})[suffixes[hit]] = value.float()
        for path, params in layers.items():
            cfg = config.for_layer(path)
            buffers, out_features, kind = {}, 0, None
            if method is OFT:
                b = (1 + math.isqrt(1 + 8 * params["oft_R"].shape[1])) // 2
                buffers = {"triu_index": OFT.triu_index(b)}
                out_features = params["oft_R"].shape[0] * b
                if cfg.block_share:
                    out_features = 0
            elif method is BOFT:
                out_features = params["boft_R"].shape[1] * params["boft_R"].shape[-1]
                kind = "conv2d" if params["boft_s"].shape[0] == 1 and params["boft_s"].shape[1] > 1 else "linear"
            src = _Source(component, path, method, cfg, params, buffers, out_features, None, kind)
            if method is OFT and cfg.block_share and cfg.rotation_side == "output":
                raise CheckpointError(f"{component}.{path}: OFT with block_share needs the model (--model) to export.")
            out.append(src)
    return out


@torch.no_grad()
def lycoris_state_dict(
    obj: Any = None,
    adapter_name: str = "default",
    *,
    adapter=None,
    unet_names: str = "auto",
    rotations: str = "auto",
    lora_rank: Optional[int] = None,
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    """(tensors, safetensors header, report) of an adapter in the LyCORIS / kohya / ComfyUI format.

    Give the pipeline or model ``obj`` holding ``adapter_name`` (needed for ``.diff`` and LoRA,
    which depend on the base weights), or a saved ``adapter`` (a PipelineAdapter) for output-side
    OFT/BOFT alone. ``rotations``: ``"auto"`` (output-side OFT/BOFT as ``oft_blocks``, everything
    else as ``.diff`` / LoRA), ``"blocks"`` (refuse what has no ``oft_blocks`` form), ``"diff"``.
    ``lora_rank``: write additive methods and input-side rotations as a rank-``r`` LoRA (truncated
    SVD of ``dW``; the largest relative Frobenius error goes into the report) instead of ``.diff``.
    ``unet_names``: see :func:`diffadapt.formats.names.community_namer`.
    """
    if rotations not in ("auto", "blocks", "diff"):
        raise ValueError(f"rotations must be 'auto', 'blocks' or 'diff', got {rotations!r}.")
    if obj is not None:
        sources = _live_sources(obj, adapter_name)
        mods = components(obj)
        classes = {n: type(m).__name__ for n, m in mods.items()}
        configs = {n: mdl.adapter_state(mods[n]).configs[adapter_name] for n in dict.fromkeys(src.component for src in sources)}
    else:
        sources = _file_sources(adapter)
        mods, classes = {}, dict(adapter.classes)
        configs = {n: c for n, (c, _) in adapter.components.items()}
    tensors: dict[str, Tensor] = {}
    notes: Counter = Counter()
    errors: list[float] = []
    kinds: Counter = Counter()
    namers = {
        n: names.community_namer(mods.get(n), classes.get(n), unet_names) for n in dict.fromkeys(x.component for x in sources)
    }
    for src in sources:
        name = _prefix(src.component, classes) + namers[src.component](src.path)
        kind, values = _layer_tensors(src, rotations, lora_rank, notes, errors)
        kinds[kind] += 1
        tensors.update({f"{name}.{k}": v for k, v in values.items()})
    report = {
        "layers": sum(kinds.values()),
        "written_as": dict(kinds),
        "max_relative_error": max(errors) if errors else 0.0,
        "notes": [f"{note} ({n} layers)" for note, n in notes.items()],
    }
    header = {
        "format": "pt",
        "ss_network_module": "lycoris.kohya",
        EXPORT_FORMAT: json.dumps({
            "diffadapt_version": __version__,
            "adapter": adapter_name,
            "components": {n: {"class": classes.get(n), "config": c.to_dict()} for n, c in configs.items()},
            "conventions": {
                "oft_blocks": "output side: W' = diag(rescale) P W; Q = A - A^T, r = (I+Q)(I-Q)^-1; 3-d: P = "
                              "blockdiag(r^T), 4-d: LyCORIS' butterfly of r; alpha = norm constraint "
                              "(alpha * out_features, 0 = none)",
                "diff": "W' = W + diff",
                "lora": "W' = W + alpha / rank * up @ down",
            },
            "report": report,
        }),
    }
    if len(kinds) == 1:
        algos = {src.method.name for src in sources}
        only = next(iter(kinds))
        algo = {"diff": "full", "lora": "lora"}.get(only) or ("boft" if "boft" in algos else "diag-oft")
        header["ss_network_args"] = json.dumps({"algo": algo})
    return tensors, header, report


def save_lycoris(obj: Any, path: Union[str, os.PathLike], adapter_name: str = "default", **kwargs) -> dict[str, Any]:
    """Write ``adapter_name`` of ``obj`` as one LyCORIS / kohya / ComfyUI ``.safetensors`` file;
    returns the report (kinds written, lossy error, notes). Options: :func:`lycoris_state_dict`."""
    tensors, header, report = lycoris_state_dict(obj, adapter_name, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return report


def write_lycoris_file(adapter: PipelineAdapter, path: Union[str, os.PathLike], **kwargs) -> dict[str, Any]:
    """Write a saved output-side OFT/BOFT adapter as a LyCORIS file without a model."""
    tensors, header, report = lycoris_state_dict(adapter=adapter, **kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return report
