"""The Stable Diffusion parts both scripts use: prompt encoding and SDXL time ids, the noise and
the epsilon / v loss of UNet families; images without torchvision (load, resize / crop / flip,
to tensor), image grids, and the model card.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import atomic_io
from common import UsageError


# ----------------------------------------------------------------------------------------------
# SD / SDXL pieces (UNet families)
# ----------------------------------------------------------------------------------------------


def tokenize(tokenizer, prompts, max_length=None) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_clip_prompts(family: str, encoders, tokenizers, prompts, device) -> dict:
    """UNet families. SD 1.x/2.x: the CLIP text encoder's last hidden state. SDXL: penultimate
    hidden states of both encoders side by side, pooled projection of the second.
    ``encoders`` may be accelerate-wrapped (trained) models."""

    if family == "sd":
        return {"encoder_hidden_states": encoders[0](tokenize(tokenizers[0], prompts).to(device))[0]}
    embeds, pooled = [], None
    for encoder, tokenizer in zip(encoders, tokenizers):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        embeds.append(out.hidden_states[-2])
    return {"encoder_hidden_states": torch.cat(embeds, dim=-1), "text_embeds": pooled}


def unet_added_cond(family: str, cond: dict, batch: dict, resolution: int, dtype) -> dict:
    """SDXL's micro-conditioning (original size, crop top-left, target size) as UNet kwargs."""

    if family != "sdxl":
        return {}
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(batch["original_sizes"], batch["crops_top_left"])]
    text_embeds = cond["text_embeds"]
    time_ids = torch.tensor(rows, device=text_embeds.device, dtype=dtype)
    return {"added_cond_kwargs": {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids}}


def unet_noise(noise_scheduler, latents, generator, noise_offset: float = 0.0):
    """(noisy latents, noise, timesteps) for an epsilon / v-prediction UNet."""

    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=latents.device
    ).long()
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def unet_target(noise_scheduler, latents, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UsageError(f"Unsupported prediction_type {kind!r} (epsilon or v_prediction).")


def unet_loss(pred, target, timesteps, noise_scheduler, snr_gamma=None) -> torch.Tensor:
    """MSE, optionally Min-SNR weighted (diffusers.training_utils.compute_snr)."""

    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


# ----------------------------------------------------------------------------------------------
# images (PIL + numpy; torchvision is not a dependency)
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(folder) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_rgb(path):
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Augmentation randomness of one item in one epoch (resume-exact, rank-independent)."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_033 + index)


def resize_crop_flip(images: list, resolution: int, center_crop: bool, random_flip: bool, rng):
    """Resize the shorter side to ``resolution``, crop a square (same crop and flip for every
    image given), returns (images, original (h, w) of the first, crop top-left)."""
    original = (images[0].height, images[0].width)
    out = []
    scale = resolution / min(original)
    w, h = max(resolution, round(original[1] * scale)), max(resolution, round(original[0] * scale))
    if center_crop:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    else:
        top, left = rng.randint(0, h - resolution), rng.randint(0, w - resolution)
    flip = random_flip and rng.random() < 0.5
    for img in images:
        img = img.resize((w, h), Image.BILINEAR).crop((left, top, left + resolution, top + resolution))
        out.append(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img)
    if flip:
        left = w - left - resolution
    return out, original, (top, left)


def to_tensor(img, normalize: bool = True) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1] (``normalize``) or [0, 1]."""

    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return x * 2.0 - 1.0 if normalize else x


def save_grid(images: list, path, rows: int = 1) -> str:
    from diffusers.utils import make_image_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(make_image_grid(images, rows=rows, cols=math.ceil(len(images) / rows)), path)
    return str(path)


def save_image_atomic(image, path) -> None:
    """PIL ``save`` into a temporary sibling, then rename (a kill leaves no truncated PNG)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format=_image_format(path))
    os.replace(tmp, path)


def _image_format(path) -> str:
    Image.init()
    return Image.EXTENSION.get(Path(path).suffix.lower(), "PNG")


GRID_HEADER = 28  # height of the column labels' strip (labelled_grid with ``columns``)
GRID_GAP = 8  # extra space between column groups


def grid_cell(row: int, col: int, size: int, label_width: int = 300, per_group: int | None = None,
              columns: int = 0) -> tuple[int, int]:
    """Top-left pixel of image ``col`` of row ``row`` in a ``labelled_grid`` (same arguments;
    ``per_group``: images per column group, ``columns``: number of groups, 0 without labels)."""
    group, j = divmod(col, per_group) if columns else (0, col)
    left = label_width + group * ((per_group or 0) * (size + 2) + GRID_GAP) + j * (size + 2)
    return left, (GRID_HEADER if columns else 0) + row * (size + 2)


def labelled_grid(rows: list[tuple[str, list]], path=None, size: int | None = None, label_width: int = 300,
                  columns: list[str] | None = None):
    """One row of images per ``(label, images)``, the label written on the left. Images are
    resized to ``size`` (nearest neighbour: small images stay crisp) when given. ``columns``:
    labels of column groups, written on top: each row's images split into that many equal
    groups (e.g. one per strength), a gap between groups."""
    size = size or rows[0][1][0].width
    cols = max(len(images) for _, images in rows)
    groups = len(columns) if columns else 0
    per = math.ceil(cols / groups) if groups else None
    if groups and any(len(images) != per * groups for _, images in rows):
        raise ValueError(f"labelled_grid: every row needs {per * groups} images for {groups} column groups")
    width = grid_cell(0, cols - 1, size, label_width, per, groups)[0] + size + 2
    grid = Image.new("RGB", (width, grid_cell(len(rows), 0, size, label_width, per, groups)[1]), "white")
    draw = ImageDraw.Draw(grid)
    for g, text in enumerate(columns or ()):
        draw.text((grid_cell(0, g * per, size, label_width, per, groups)[0] + 2, GRID_HEADER // 2 - 6), text,
                  fill="black")
    for i, (label, images) in enumerate(rows):
        top = grid_cell(i, 0, size, label_width, per, groups)[1]
        lines = label.split("\n")
        for k, line in enumerate(lines):
            draw.text((4, top + size // 2 - 6 * len(lines) + 12 * k), line, fill="black")
        for j, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((size, size), Image.NEAREST),
                       grid_cell(i, j, size, label_width, per, groups))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(grid, path)
    return grid


def log_images(accelerator, tag: str, images: list, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------


def card_config(config, preset) -> dict:
    """The config as the model card shows it (the preset named when targets came from one)."""
    out = config.to_dict()
    if out.get("target_modules") is None:
        out["target_modules"] = f"preset {preset or 'attention'!r} (derived from the model's structure)"
    return out


EMBEDDED_BASE = "diffadapt.default_model_path()"


def is_embedded(name_or_path) -> bool:
    """Whether ``name_or_path`` is the small model shipped inside diffadapt."""
    from diffadapt.defaults import default_model_path

    try:
        return os.path.realpath(str(name_or_path)) == os.path.realpath(default_model_path())
    except FileNotFoundError:
        return False


def base_model_code(name_or_path) -> str:
    """The Python expression a model card's snippet loads the base with (``import diffadapt as
    da``): the embedded default is ``da.default_model_path()``, its folder is a path of this machine."""
    return "da.default_model_path()" if is_embedded(name_or_path) else repr(str(name_or_path))


def write_model_card(args, *, title: str, tags: list[str], base_model: str, usage: str, config: dict,
                     trainable: dict, extra: str = "", images: list[str] = ()) -> None:
    embedded = is_embedded(base_model)  # not a hub id: no base_model front matter, named by its function
    front = ["---"] + ([] if embedded else [f"base_model: {base_model}"]) + ["library_name: diffadapt", "tags:"]
    front += [f"- {t}" for t in ["diffadapt", "diffusers", args.method, *tags]]
    front += ["---", ""]
    base = (f"the small model embedded in diffadapt (`{EMBEDDED_BASE}`, loaded with "
            f"`DiffusionPipeline.from_pretrained({EMBEDDED_BASE})`)" if embedded else f"`{base_model}`")
    lines = [
        f"# {title}",
        "",
        f"A **{args.method}** adapter (diffadapt) for {base}, trained with "
        f"`train_scripts/{Path(sys.argv[0]).name}`.",
        "",
        extra,
        "## Use",
        "",
        "```python",
        usage.strip(),
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| steps | {args.max_train_steps} |",
        f"| batch size per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |",
        f"| learning rate / scheduler | {args.learning_rate:g} / {args.lr_scheduler} |",
        f"| resolution | {args.resolution} |",
        f"| mixed precision | {args.mixed_precision or 'no'} |",
        f"| seed | {args.seed} |",
    ]
    lines += [f"| trainable parameters ({role}) | {n:,} |" for role, n in trainable.items()]
    lines += ["", "Adapter config:", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    if images:
        lines += ["## Validation images", ""] + [f"![{Path(p).stem}]({p})" for p in images] + [""]
    atomic_io.write_text_atomic(Path(args.output_dir, "README.md"), "\n".join(front + lines))
