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
from typing import TYPE_CHECKING

import atomic_io
from common import UsageError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (fast --help)
    import torch

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
    import torch

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
    import torch

    if family != "sdxl":
        return {}
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(batch["original_sizes"], batch["crops_top_left"])]
    text_embeds = cond["text_embeds"]
    time_ids = torch.tensor(rows, device=text_embeds.device, dtype=dtype)
    return {"added_cond_kwargs": {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids}}


def unet_noise(noise_scheduler, latents, generator, noise_offset: float = 0.0):
    """(noisy latents, noise, timesteps) for an epsilon / v-prediction UNet."""
    import torch

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
    import torch
    import torch.nn.functional as F

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
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Augmentation randomness of one item in one epoch (resume-exact, rank-independent)."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_033 + index)


def resize_crop_flip(images: list, resolution: int, center_crop: bool, random_flip: bool, rng):
    """Resize the shorter side to ``resolution``, crop a square (same crop and flip for every
    image given), returns (images, original (h, w) of the first, crop top-left)."""
    from PIL import Image

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
    import numpy as np
    import torch

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
    from PIL import Image

    Image.init()
    return Image.EXTENSION.get(Path(path).suffix.lower(), "PNG")


def labelled_grid(rows: list[tuple[str, list]], path=None, size: int | None = None, label_width: int = 300):
    """One row of images per ``(label, images)``, the label written on the left. Images are
    resized to ``size`` (nearest neighbour: small images stay crisp) when given."""
    from PIL import Image, ImageDraw

    size = size or rows[0][1][0].width
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + cols * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, images) in enumerate(rows):
        top = i * (size + 2)
        lines = label.split("\n")
        for k, line in enumerate(lines):
            draw.text((4, top + size // 2 - 6 * len(lines) + 12 * k), line, fill="black")
        for j, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (label_width + j * (size + 2), top))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(grid, path)
    return grid


def log_images(accelerator, tag: str, images: list, step: int) -> None:
    import numpy as np

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
        out["target_modules"] = f"preset {preset or 'attention'!r} (diffadapt.PRESETS)"
    return out


def write_model_card(args, *, title: str, tags: list[str], base_model: str, usage: str, config: dict,
                     trainable: dict, extra: str = "", images: list[str] = ()) -> None:
    front = ["---", f"base_model: {base_model}", "library_name: diffadapt", "tags:"]
    front += [f"- {t}" for t in ["diffadapt", "diffusers", args.method, *tags]]
    front += ["---", ""]
    lines = [
        f"# {title}",
        "",
        f"A **{args.method}** adapter (diffadapt) for `{base_model}`, trained with "
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
