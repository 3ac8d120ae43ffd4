"""The ControlNet script's offline dataset: shape-world scenes with their object masks (white on
black, fill50k-style) in the --train_data_dir layout (metadata.jsonl, images/, conditioning_images/)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

from PIL import Image

import atomic_io
import sd_parts
from diffadapt.embedded import world


def conditioning_mask(scene, size: int) -> Image.Image:
    """The object's filled mask, white (255) on black (0), at the scene's position, size and rotation."""
    plain = replace(scene, color="white", background="black", texture="plain")
    low, high = sum(world.COLORS["black"]) / 3, sum(world.COLORS["white"]) / 3
    gray = world.render(plain, size).convert("L")
    return gray.point(lambda v: round(min(max((v - low) * 255 / (high - low), 0), 255))).convert("RGB")


def sample_scenes(count: int, seed: int) -> list:
    """``count`` distinct world.Scenes, deterministic for ``seed``: render_control_data's training
    scenes are the first ``n``, its held-out ones the next (a longer list starts with a shorter one's
    scenes, so benchmarks/quality.py draws more held-out masks after the same training set)."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < count:  # distinct scenes: a held-out mask is never a training one
        scene = world.sample_scene(rng)
        if scene not in scenes:
            scenes.append(scene)
    return scenes


def render_control_data(folder, n: int, held_out: int, seed: int, size: int = 64) -> list[tuple]:
    """``n`` shape-world examples in the --train_data_dir layout under ``folder`` (metadata.jsonl,
    images/, conditioning_images/; each row also names its world.Scene), deterministic for ``seed``; returns ``held_out`` more
    (caption, mask, scene) triples, of scenes not written (before_after.png's rows)."""
    scenes = sample_scenes(n + held_out, seed)
    folder = Path(folder)
    for sub in ("images", "conditioning_images"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes[:n]):
        name = f"{i:04d}.png"
        sd_parts.save_image_atomic(world.render(scene, size), folder / "images" / name)
        sd_parts.save_image_atomic(conditioning_mask(scene, size), folder / "conditioning_images" / name)
        rows.append({"image": f"images/{name}", "conditioning_image": f"conditioning_images/{name}",
                     "text": world.caption(scene), "scene": asdict(scene)})  # the scene: for checks
    atomic_io.write_text_atomic(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return [(world.caption(s), conditioning_mask(s, size), s) for s in scenes[n:]]
