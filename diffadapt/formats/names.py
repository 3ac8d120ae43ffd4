"""Module names in community adapter files (kohya / LyCORIS / ComfyUI) <-> diffusers module paths.

Community files name a module by its path with ``.`` replaced by ``_`` after a prefix
(``lora_unet_down_blocks_0_attentions_0_proj_in``). Which path depends on the trainer:

* SD 1.x (kohya, LyCORIS on diffusers): the diffusers UNet path;
* SDXL (kohya trains its own "sgm"/ldm UNet): the original ldm path,
  ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` -- :func:`ldm_unet_paths` maps a diffusers
  ``UNet2DConditionModel`` onto it from the model's own block structure;
* CLIP text encoders: the ``transformers`` path with ``text_model.`` (which transformers 5 drops
  inside ``CLIPTextModel``: both spellings are accepted, ``text_model_`` is written), except
  ``CLIPTextModelWithProjection.text_projection``, which sits beside ``text_model``
  (``lora_te2_text_projection``, as kohya, LyCORIS and ComfyUI name it; the old
  ``lora_te2_text_model_text_projection`` is still read);
* DiTs (SD3, Flux, PixArt): the diffusers path.

Underscored names are ambiguous on their own (``to_q`` vs ``to.q``), so they are resolved against
the modules the model really has: :func:`module_table` lists every spelling of every adaptable
module of a model.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from diffadapt.host import SUPPORTED_LAYERS, AdapterHost
from diffadapt.targets import inside_wrapper

_RESNET = {  # diffusers ResnetBlock2D child -> ldm ResBlock child
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {  # diffusers UNet2DConditionModel top-level module -> ldm path
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_CLIP_TOP = ("text_projection",)  # CLIP modules outside text_model (CLIPTextModelWithProjection)


def flat(path: str) -> str:
    """``a.b.c`` -> ``a_b_c``: how community files spell a module path."""
    return path.replace(".", "_")


def adaptable_paths(model: nn.Module) -> list[str]:
    """Paths of the Linear / Conv1D / Conv2d layers of ``model`` (diffadapt hosts count as their layer)."""
    out = []
    for name, module in model.named_modules():
        if not name or inside_wrapper(name):
            continue
        if isinstance(module, (AdapterHost, *SUPPORTED_LAYERS)):
            out.append(name)
    return out


def _map_block(out: dict[str, str], model: nn.Module, src: str, dst: str, children: Optional[dict] = None) -> None:
    """Map every module under diffusers path ``src`` to ldm path ``dst`` (renaming first children)."""
    block = model.get_submodule(src)
    for name, _ in block.named_modules():
        if not name:
            out[src] = dst
            continue
        head, _, rest = name.partition(".")
        head = (children or {}).get(head, head)
        out[f"{src}.{name}"] = f"{dst}.{head}" + (f".{rest}" if rest else "")


def _map_resnet_attention(out: dict[str, str], unet: nn.Module, block: str, j: int, attentions, dst: str) -> None:
    """Resnet ``j`` of diffusers ``block`` (and its attention, if the block has them) -> ldm ``dst``'s 0 / 1."""
    _map_block(out, unet, f"{block}.resnets.{j}", f"{dst}.0", _RESNET)
    if attentions is not None:
        _map_block(out, unet, f"{block}.attentions.{j}", f"{dst}.1")


def ldm_unet_paths(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> ldm (original SD / SGM) path, for a ``UNet2DConditionModel``.

    Built from the model's own blocks: ``input_blocks.0`` is ``conv_in``; each down block adds one
    ``input_blocks.k`` per resnet (``.0`` resnet, ``.1`` its attention) and one for its downsampler
    (``.0.op``); ``middle_block.0/1/2`` = resnet, attention, resnet; each up block adds one
    ``output_blocks.k`` per resnet, its upsampler riding on the block's last one (``.1.conv``, or
    ``.2.conv`` after an attention).
    """
    out: dict[str, str] = {}
    known = {n for n, _ in unet.named_modules()}
    for src, dst in _TOP.items():
        if src in known:
            out[src] = dst
    k = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            _map_resnet_attention(out, unet, f"down_blocks.{i}", j, attentions, f"input_blocks.{k}")
            k += 1
        if getattr(block, "downsamplers", None) is not None:
            _map_block(out, unet, f"down_blocks.{i}.downsamplers.0", f"input_blocks.{k}.0", {"conv": "op"})
            k += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        parts, attentions = [("resnets", 0)], getattr(mid, "attentions", None) or []
        for j in range(1, len(mid.resnets)):
            if j - 1 < len(attentions) and attentions[j - 1] is not None:
                parts.append(("attentions", j - 1))
            parts.append(("resnets", j))
        for n, (kind, j) in enumerate(parts):
            _map_block(out, unet, f"mid_block.{kind}.{j}", f"middle_block.{n}", _RESNET if kind == "resnets" else None)
    k = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            _map_resnet_attention(out, unet, f"up_blocks.{i}", j, attentions, f"output_blocks.{k}")
            if j == len(block.resnets) - 1 and getattr(block, "upsamplers", None) is not None:
                slot = 2 if attentions is not None else 1
                _map_block(out, unet, f"up_blocks.{i}.upsamplers.0", f"output_blocks.{k}.{slot}")
            k += 1
    return out


def is_clip(model: nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText")


def is_sdxl_unet(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return type(model).__name__ == "UNet2DConditionModel" and getattr(config, "addition_embed_type", None) == "text_time"


def module_table(model: nn.Module) -> dict[str, str]:
    """Every community spelling (underscored, no prefix) of every adaptable module -> its path.

    Spellings: the diffusers / transformers path; for CLIP also with and without ``text_model.``;
    for a ``UNet2DConditionModel`` also the ldm path. A spelling two modules share is dropped.
    """
    table: dict[str, Optional[str]] = {}

    def add(name: str, path: str) -> None:
        key = flat(name)
        table[key] = path if table.get(key, path) == path else None

    paths = adaptable_paths(model)
    for path in paths:
        add(path, path)
    if is_clip(model):
        for path in paths:
            add(path.removeprefix("text_model.") if path.startswith("text_model.") else "text_model." + path, path)
    if type(model).__name__ == "UNet2DConditionModel":
        ldm = ldm_unet_paths(model)
        for path in paths:
            if path in ldm and flat(ldm[path]) not in table:
                add(ldm[path], path)
    return {k: v for k, v in table.items() if v is not None}


def community_namer(model: Optional[nn.Module], class_name: Optional[str] = None, unet_names: str = "auto") -> Callable[[str], str]:
    """``path -> underscored name`` as UIs expect it for the modules of ``model`` (prefix not included).

    ``unet_names``: ``"auto"`` (ldm names for an SDXL UNet, as kohya writes them, diffusers names
    otherwise), ``"ldm"`` or ``"diffusers"``. CLIP paths get ``text_model.``. Without ``model``
    (only its ``class_name``) names are diffusers / transformers paths.
    """
    if unet_names not in ("auto", "ldm", "diffusers"):
        raise ValueError(f"unet_names must be 'auto', 'ldm' or 'diffusers', got {unet_names!r}.")
    cls = class_name or (type(model).__name__ if model is not None else "")
    if cls.startswith("CLIPText"):
        # CLIPTextModelWithProjection's text_projection sits beside text_model, not in it: kohya,
        # LyCORIS and ComfyUI spell it lora_te2_text_projection
        return lambda path: flat(path if path.startswith("text_model.") or path in _CLIP_TOP else "text_model." + path)
    if cls == "UNet2DConditionModel" and model is not None:
        if unet_names == "ldm" or (unet_names == "auto" and is_sdxl_unet(model)):
            ldm = ldm_unet_paths(model)

            def name(path: str) -> str:
                if path not in ldm:
                    raise ValueError(f"{path!r} has no ldm name in this UNet; export with unet_names='diffusers'.")
                return flat(ldm[path])

            return name
    return flat
