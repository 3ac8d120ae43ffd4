"""A tiny procedural image world for the embedded default model and for offline DreamBooth.

One object per image: a shape with a colour, a size, a texture, a position and a rotation, on a
plain background, drawn with PIL (supersampled, so edges are anti-aliased). Every image comes
with a caption that states its attributes, e.g. "a small striped red star on a blue background
in the top left". Everything is deterministic for a seed.

The DreamBooth subject (``SUBJECT``: a striped purple hexagon) is held out of the pretraining
distribution: ``sample_scene`` never draws that combination, so the base model has never seen
it, and ``subject_images`` draws it in several poses for fine-tuning.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = {"small": 0.17, "large": 0.32}  # radius as a fraction of the image side
TEXTURES = ("plain", "striped", "dotted")
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
LIGHT = ("white", "yellow", "orange")  # texture marks are black on these, white on the rest

TRIGGER = "sks"
SUBJECT = {"shape": "hexagon", "color": "purple", "texture": "striped"}
INSTANCE_PROMPT = f"a photo of {TRIGGER} hexagon"
CLASS_PROMPT = "a photo of a hexagon"
# prompts with nothing of the subject in them: what an adapter should leave alone (drift)
UNRELATED_PROMPTS = (
    "a large red circle on a blue background",
    "a small yellow star on a green background",
    "a large striped white square on a black background",
    "a large dotted orange triangle on a purple background",
    "a small blue cross on a white background",
    "a large green circle on an orange background",
)
# every word a caption or a DreamBooth prompt may use (the tokenizer's vocabulary)
WORDS = sorted(
    set(SHAPES) | set(COLORS) | set(SIZES) | set(TEXTURES) | {w for r in REGIONS for w in r.split()}
    | {"a", "an", "photo", "picture", "image", "of", "on", "in", "the", "background", "shape", TRIGGER}
)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    texture: str
    background: str
    x: float  # centre, fraction of the width (0 = left)
    y: float  # centre, fraction of the height (0 = top)
    rotation: float  # degrees
    scale: float = 1.0  # jitter around the nominal size

    @property
    def region(self) -> str:
        col = ("left", "", "right")[min(int(self.x * 3), 2)]
        row = ("top", "", "bottom")[min(int(self.y * 3), 2)]
        return f"{row} {col}".strip() or "center"


def is_subject(scene: Scene) -> bool:
    return all(getattr(scene, k) == v for k, v in SUBJECT.items())


def _place(rng: random.Random, size: str, scale: float) -> tuple[float, float]:
    margin = SIZES[size] * scale + 0.02
    return rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)


def sample_scene(rng: random.Random, allow_subject: bool = False, **fixed) -> Scene:
    """A random scene; keyword arguments pin attributes. Never the held-out subject unless allowed."""
    if not allow_subject and all(fixed.get(k) == v for k, v in SUBJECT.items()):
        raise ValueError("these attributes pin the held-out subject; pass allow_subject=True")
    while True:
        shape = fixed.get("shape", rng.choice(SHAPES))
        color = fixed.get("color", rng.choice(list(COLORS)))
        size = fixed.get("size", rng.choice(list(SIZES)))
        texture = fixed.get("texture", rng.choice(TEXTURES))
        background = fixed.get("background", rng.choice([c for c in COLORS if c != color]))
        scale = rng.uniform(0.9, 1.1)
        x, y = _place(rng, size, scale)
        scene = Scene(shape, color, size, texture, background, x, y, rng.uniform(-30, 30), scale)
        if allow_subject or not is_subject(scene):
            return replace(scene, **{k: v for k, v in fixed.items() if k in ("x", "y", "rotation", "scale")})


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n, radii, start):
        return [
            (cx + radii[i % len(radii)] * math.cos(a), cy + radii[i % len(radii)] * math.sin(a))
            for i in range(n)
            for a in [math.radians(start + rot + 360.0 * i / n)]
        ]

    if shape == "circle":
        return ring(64, [r], 0)
    if shape == "square":
        return ring(4, [r * 0.9 * math.sqrt(2) * 0.85], 45)
    if shape == "triangle":
        return [(x, y + r * 0.15) for x, y in ring(3, [r * 1.1], -90)]
    if shape == "star":
        return ring(10, [r * 1.1, r * 0.45], -90)
    if shape == "hexagon":
        return ring(6, [r], 0)
    if shape == "cross":
        t, u = r * 0.35, r
        pts = [(-t, -u), (t, -u), (t, -t), (u, -t), (u, t), (t, t), (t, u), (-t, u), (-t, t), (-u, t), (-u, -t), (-t, -t)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels."""
    big = size * supersample
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    poly = _outline(scene.shape, scene.x * big, scene.y * big, SIZES[scene.size] * scene.scale * big, scene.rotation)
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    fill = Image.new("RGB", (big, big), COLORS[scene.color])
    if scene.texture != "plain":
        mark = (0, 0, 0) if scene.color in LIGHT else (255, 255, 255)
        draw = ImageDraw.Draw(fill)
        step = big / 8  # 8 stripes / dots per image side, rotating with the object
        c, s = math.cos(math.radians(scene.rotation + 45)), math.sin(math.radians(scene.rotation + 45))
        cx, cy = scene.x * big, scene.y * big
        for i in range(-5, 6):
            if scene.texture == "striped":
                a, b = i * step, i * step + step * 0.45
                corners = [(a, -big), (b, -big), (b, big), (a, big)]
                draw.polygon([(cx + u * c - v * s, cy + u * s + v * c) for u, v in corners], fill=mark)
            else:
                for j in range(-5, 6):
                    u, v = i * step, j * step
                    px, py, rr = cx + u * c - v * s, cy + u * s + v * c, step * 0.22
                    draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=mark)
    img.paste(fill, (0, 0), mask)
    return img.resize((size, size), Image.LANCZOS)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The full caption; with ``rng``, a random paraphrase that may leave attributes out."""
    keep = (lambda p: rng.random() < p) if rng else (lambda p: True)
    words = ["a"]
    if keep(0.8):
        words.append(scene.size)
    if scene.texture != "plain" and keep(0.85):
        words.append(scene.texture)
    if keep(0.85):
        words.append(scene.color)
    words.append(scene.shape)
    if keep(0.8):
        words += ["on", "a", scene.background, "background"]
    if keep(0.5 if rng else 1.0):
        words += ["in", "the", scene.region] if scene.region != "center" else ["in", "the", "center"]
    text = re.sub(r"\ba ([aeiou])", r"an \1", " ".join(words))
    if rng and rng.random() < 0.3:
        text = f"a photo of {text}"
    return text


def dataset(n: int, seed: int = 0, size: int = 64, paraphrase: bool = False):
    """``n`` (image, caption, scene) triples from the pretraining distribution."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((render(scene, size), caption(scene, rng if paraphrase else None), scene))
    return out


def subject_images(n: int = 5, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """The held-out subject in ``n`` poses (position, size, rotation, background)."""
    rng = random.Random(seed)
    return [render(sample_scene(rng, allow_subject=True, **SUBJECT), size) for _ in range(n)]


def class_images(n: int = 50, seed: int = 0, size: int = 64) -> list[tuple[Image.Image, str]]:
    """Ground-truth prior-preservation images: hexagons that are not the subject, with captions."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, shape="hexagon")
        out.append((render(scene, size), caption(scene)))
    return out


def color_fraction(image: Image.Image, color: str, tol: int = 60) -> float:
    """Share of pixels within ``tol`` (L1/3) of a named colour: a crude check of what was drawn."""
    target = COLORS[color]
    px = list(image.convert("RGB").getdata())
    hit = sum(1 for p in px if sum(abs(a - b) for a, b in zip(p, target)) / 3 < tol)
    return hit / len(px)
