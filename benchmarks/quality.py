#!/usr/bin/env python
"""Subject fidelity and drift of every method on the embedded default model.

For each method the main job — ``train_scripts/train_dreambooth.py`` with its embedded defaults
(the bundled subject, the method's default hyper-parameters and learning rate, EMBEDDED_STEPS
steps) — trains an adapter. Then, with the same seeds for the base model and the adapted one:

* **subject fidelity**, on images of the instance prompt, read by a *probe*: a small CNN trained
  here on the procedural world to name each image's shape, colour, texture, background and size
  (the world's own ground truth, so no ImageNet network is needed or wanted):
  - subject rate: share of images the probe reads as the subject (hexagon AND purple AND striped);
  - look rate: the same without the shape (purple AND striped): the base model draws hexagons
    round, so the shape is where the probe and the base model are weakest;
  - similarity: mean cosine similarity of probe features, generated vs instance images, over all
    pairs — the analogue of the DINO score of DreamBooth and of PEFT's image-generation benchmark.
* **drift**, on images of unrelated prompts (``world.UNRELATED_PROMPTS``), adapted vs base image
  of the same seed:
  - pixel drift: mean absolute difference (0..1);
  - feature drift: 1 - cosine similarity of probe features;
  - prompt accuracy: share of images whose probe-read shape, colour and background all match the
    prompt (the base model's own accuracy is the reference);
* **class prompt** (``world.CLASS_PROMPT``, what prior preservation is meant to keep): class
  look rate, the share of its images the probe reads with the subject's look (purple AND
  striped); the base model's is the reference, a high one means the class became the subject;
* trainable parameters, adapter file size and training time (from train_log.jsonl).

    python benchmarks/quality.py                          # every method, results in benchmarks/quality/
    python benchmarks/quality.py --methods oft hra --steps 200
    python benchmarks/quality.py --score OUT_DIR [...]     # trained adapters, e.g. the main job's output
    python benchmarks/quality.py --methods fourierft --prior both   # without and with prior preservation

Offline, CPU: ~25 min for the five methods on 2 cores at the main job's defaults (each trains ~3.5 min with
its output distillation and text encoder; the probe, trained once and cached, ~8 min more).

**ControlNet mode** (``--controlnet``): does the adapted ControlNet draw the object where the
conditioning mask puts it, better than the base? ``train_scripts/train_controlnet.py`` at its
embedded defaults (no --train_data_dir: 64 shape-world scenes and their filled masks, FourierFT on
the ControlNet plus its new layers, 300 steps, seed ``--seed``) trains into <work_dir>/controlnet
(``--reuse``: kept if there). Held-out masks: the scenes ``control_data.sample_scenes`` draws after
the training ones for the same seed (never a training scene; checked against its metadata.jsonl),
each generated from its caption and mask with the same seed (1000 x ``--seed`` + index) by

* **base**: the ControlNet as training starts (``ControlNetModel.from_unet`` with the script's
  conditioning embedding): its zero output convolutions add nothing, so these are the base model's
  images for the caption — which states the size and the region ("in the top left"), so the base
  has the text's hint of where; what it lacks is the mask;
* **trained ControlNet, adapter off**: the trained new layers (conditioning embedding, zero
  convolutions) with the adapter at strength 0 — what the adapter adds beyond them;
* **adapted**: the trained ControlNet with its adapter at strength 1 (what users load);
* **scenes**: the held-out scenes' own renders — the metric's ceiling on these masks.

Metric, per image, pixel-exact against the mask (mask > 127): the *foreground* is every pixel whose
colour is farther than ``FG_TOL`` from the image's background (Euclidean RGB distance, 0..255; half
the distance of the world's closest two colours, orange and yellow), the background colour being the per-channel median of the image's ``BORDER``-pixel
frame (the world draws plain backgrounds; objects keep off the frame), then a 3x3 closing (stripes
or dots of the background's colour on the object do not punch holes). Then

* **IoU** of foreground and mask (1: the object exactly where and as large as the mask says; 0: no
  overlap or nothing drawn), the main number; **hit rate**: share of images with IoU >= 0.5;
* **centroid error**: distance between the foreground's and the mask's centroids, as a fraction of
  the image side (an image with no foreground counts 1.0);
* **paired**: per image, the adapted IoU minus the base IoU (same mask, seed and caption): mean,
  and on how many images the adapted one is higher / lower; the same against the adapter off (what
  the adapter adds to the trained new layers).

    python benchmarks/quality.py --controlnet --threads 1      # ~2.5 min on 2 cores (training ~1 min)
    python benchmarks/quality.py --controlnet --reuse --images 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import sd_parts  # noqa: E402  (train_scripts/sd_parts.py: labelled_grid)

import diffadapt as da  # noqa: E402
from diffadapt.embedded import world  # noqa: E402

DREAMBOOTH = ROOT / "train_scripts" / "train_dreambooth.py"
CONTROLNET = ROOT / "train_scripts" / "train_controlnet.py"
METHODS = da.METHOD_NAMES  # every built-in method (the registry)
HEADS = {"shape": world.SHAPES, "color": tuple(world.COLORS), "texture": world.TEXTURES,
         "background": tuple(world.COLORS), "size": tuple(world.SIZES)}
PROBE_VERSION = 2  # bump when the probe or its training changes (cached probes are keyed by it)


# ----------------------------------------------------------------------------------------------
# the probe: what a generated image shows, in the world's own terms
# ----------------------------------------------------------------------------------------------


class Probe(nn.Module):
    """A small CNN: 64x64 RGB in [0, 1] -> 128-d features -> one classifier per attribute."""

    def __init__(self, width: int = 128):
        super().__init__()
        layers, c = [nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.SiLU()], 16  # 64 -> 32
        for w in (32, 64, width):  # -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in HEADS.items()})

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        f = self.body(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_batch(images, size: int = 64) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float in [0, 1]."""
    return torch.stack([sd_parts.to_tensor(im.convert("RGB").resize((size, size)), normalize=False) for im in images])


def labels_of(scenes) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([values.index(getattr(s, k)) for s in scenes]) for k, values in HEADS.items()}


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma per image (separable, 7 taps)."""
    r = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (N*3, 7)
    n, c, h, w = x.shape
    y = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated images look like next to clean renders: soft edges, colour casts, noise."""
    n = x.shape[0]
    x = blur(x, torch.rand(n, generator=g) * 1.0)
    x = x * (1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def render_set(n: int, seed: int):
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, allow_subject=rng.random() < 0.05) for _ in range(n)]
    return to_batch([world.render(s) for s in scenes]), labels_of(scenes)


def train_probe(steps: int = 5000, n: int = 12000, batch: int = 64, seed: int = 0) -> Probe:
    torch.manual_seed(seed)
    x, y = render_set(n, seed=10_000 + seed)  # scenes no pretraining seed draws in this order
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        out = probe(augment(x[idx], g))
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0:
            print(f"  probe step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: Probe, x: torch.Tensor, y: dict) -> dict[str, float]:
    out = probe(x)
    return {k: (out[k].argmax(1) == y[k]).float().mean().item() for k in HEADS}


@torch.no_grad()
def vae_round_trip(pipe, x: torch.Tensor) -> torch.Tensor:
    """Images through the base model's VAE and back: the texture of generated images, known content."""
    vae = pipe.vae
    latents = vae.encode(x * 2 - 1).latent_dist.mean
    return ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def load_probe(work: Path, pipe, steps: int = 5000, scenes: int = 12000) -> tuple[Probe, dict]:
    """The probe, trained once and cached in ``work``; with its held-out accuracies. ``steps`` /
    ``scenes`` below the defaults: a cheaper, weaker probe (cached under its own name)."""
    smaller = "" if (steps, scenes) == (5000, 12000) else f"_s{steps}_n{scenes}"
    path = work / f"probe_v{PROBE_VERSION}{smaller}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        probe = Probe()
        probe.load_state_dict(saved["state"])
        return probe.eval(), saved["accuracy"]
    print("training the probe on rendered world scenes ...", flush=True)
    probe = train_probe(steps=steps, n=scenes)
    x, y = render_set(1000, seed=20_000)
    accuracy = {"renders": probe_accuracy(probe, x, y),
                "vae_round_trip": probe_accuracy(probe, vae_round_trip(pipe, x[:256]), {k: v[:256] for k, v in y.items()})}
    print(f"  probe accuracy on held-out scenes: {json.dumps(accuracy)}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"state": probe.state_dict(), "accuracy": accuracy}, path)
    return probe, accuracy


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def prompt_attributes(prompt: str) -> dict[str, str]:
    """'a small yellow star on a green background' -> shape, color, background (what it states)."""
    words = prompt.split()
    out = {}
    for i, w in enumerate(words):
        if w in world.SHAPES and "shape" not in out:
            out["shape"] = w
            colors = [v for v in words[:i] if v in world.COLORS]
            if colors:
                out["color"] = colors[-1]
        if w == "background" and i > 0 and words[i - 1] in world.COLORS:
            out["background"] = words[i - 1]
    return out


@torch.no_grad()
def read(probe: Probe, images) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Probe features (L2-normalised) and attribute names of images."""
    x = to_batch(images)
    f = probe.features(x)
    names = {k: [HEADS[k][i] for i in head(f).argmax(1).tolist()] for k, head in probe.heads.items()}
    return F.normalize(f, dim=1), names


def subject_scores(probe, generated, instance) -> dict[str, float]:
    f_gen, names = read(probe, generated)
    f_inst, _ = read(probe, instance)
    hits = [all(names[k][i] == v for k, v in world.SUBJECT.items()) for i in range(len(generated))]
    looks = [names["color"][i] == world.SUBJECT["color"] and names["texture"][i] == world.SUBJECT["texture"]
             for i in range(len(generated))]
    return {"subject_rate": float(np.mean(hits)), "look_rate": float(np.mean(looks)),
            "similarity": (f_gen @ f_inst.T).mean().item()}


def drift_scores(probe, adapted: dict, base: dict) -> dict[str, float]:
    """``adapted`` / ``base``: prompt -> images of the same seeds."""
    pixel, feature, correct = [], [], []
    for prompt, images in adapted.items():
        want = prompt_attributes(prompt)
        fa, names = read(probe, images)
        fb, _ = read(probe, base[prompt])
        feature.append((1 - (fa * fb).sum(1)).mean().item())
        pixel.append(float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                                    for a, b in zip(images, base[prompt])])))
        correct += [all(names[k][i] == v for k, v in want.items()) for i in range(len(images))]
    return {"pixel_drift": float(np.mean(pixel)), "feature_drift": float(np.mean(feature)),
            "prompt_accuracy": float(np.mean(correct))}


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(pipe, prompt: str, seeds, steps: int, batch: int = 8):
    images = []
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        images += pipe([prompt] * len(chunk), generator=gens, num_inference_steps=steps).images
    return images


def sample_all(pipe, args) -> dict:
    subject = generate(pipe, world.INSTANCE_PROMPT, list(range(args.subject_images)), args.inference_steps)
    unrelated = {p: generate(pipe, p, list(range(args.drift_seeds)), args.inference_steps)
                 for p in world.UNRELATED_PROMPTS}
    classes = generate(pipe, world.CLASS_PROMPT, list(range(args.class_seeds)), args.inference_steps)
    return {"subject": subject, "unrelated": unrelated, "class": classes}


def class_scores(probe, images) -> dict[str, float]:
    """Share of class-prompt images read with the subject's look (purple and striped)."""
    if not images:
        return {}
    _, names = read(probe, images)
    looks = [names["color"][i] == world.SUBJECT["color"] and names["texture"][i] == world.SUBJECT["texture"]
             for i in range(len(images))]
    return {"class_look_rate": float(np.mean(looks))}


# ----------------------------------------------------------------------------------------------
# training through the main job
# ----------------------------------------------------------------------------------------------


def train(method: str, out: Path, args, prior: bool = False) -> None:
    """The main job for ``method`` into ``out``; ``prior``: with prior preservation, its class
    images generated by the base model itself (the script writes them into out/class_images)."""
    cmd = [sys.executable, str(DREAMBOOTH), "--method", method, "--output_dir", str(out), "--seed", str(args.seed),
           "--report_to", "none", "--num_validation_images", "2"]
    if args.steps:
        cmd += ["--max_train_steps", str(args.steps)]
    if prior:
        cmd += ["--with_prior_preservation", "--num_class_images", str(args.num_class_images),
                "--prior_loss_weight", str(args.prior_loss_weight)]
    cmd += shlex.split(args.train_args)
    print(f"training {method}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def adapter_facts(out: Path, pipe) -> dict:
    """Method, steps, training seconds, file size and trained parameters of the adapter loaded
    into ``pipe`` as "trained" (fixed tensors files carry — FourierFT positions, FRoD's basis —
    are not parameters)."""
    meta = json.loads((out / "diffadapt_adapter.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    trainable = sum(p.numel() for c in meta["components"]
                    for p in da.adapter_parameters(getattr(pipe, c), "trained").values())
    return {"method": meta["metadata"]["method"], "steps": log[-1]["step"], "train_seconds": log[-1]["seconds"],
            "file_bytes": sum(f.stat().st_size for f in out.glob("*/adapter_model.safetensors")),  # not checkpoints
            "trainable": trainable}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def grids(results_dir: Path, instance, rows: dict) -> None:
    """subject.png: instance images, then the instance prompt per model; drift.png: the first seed
    of every unrelated prompt per model."""
    sd_parts.labelled_grid([("instance images", instance)]
                         + [(f"{name}:\n{world.INSTANCE_PROMPT}", r["samples"]["subject"][:8]) for name, r in rows.items()],
                         results_dir / "subject.png", size=96, label_width=200)
    sd_parts.labelled_grid([(name, [imgs[0] for imgs in r["samples"]["unrelated"].values()]) for name, r in rows.items()],
                         results_dir / "drift.png", size=96, label_width=200)


def table(rows: dict) -> str:
    head = ("| model | subject rate | look rate | similarity | pixel drift | feature drift | prompt accuracy "
            "| class look rate | trainable | file | train s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        s, facts = r["scores"], r.get("facts", {})
        lines.append(
            f"| {name} | {s['subject_rate']:.2f} | {s['look_rate']:.2f} | {s['similarity']:.3f} | {s.get('pixel_drift', 0):.3f} "
            f"| {s.get('feature_drift', 0):.3f} | {s['prompt_accuracy']:.2f} "
            + (f"| {s['class_look_rate']:.2f} " if "class_look_rate" in s else "| – ")
            + f"| {facts.get('trainable', 0):,} | {facts.get('file_bytes', 0) / 1024:.0f} KiB "
            f"| {facts.get('train_seconds', 0):.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ControlNet: does the output follow the conditioning mask?
# ----------------------------------------------------------------------------------------------

FG_TOL = 40  # a foreground pixel: RGB distance to the background above this (the closest world colours: 82)
BORDER = 2  # the frame (pixels) whose median colour is the background


def mask_pixels(mask: Image.Image) -> np.ndarray:
    """The conditioning mask (white object on black) as booleans."""
    return np.asarray(mask.convert("L")) > 127


def close3(fg: np.ndarray) -> np.ndarray:
    """3x3 binary closing: dilate, then erode (the image's edge erodes nothing)."""
    x = torch.from_numpy(fg.astype(np.float32))[None, None]
    grown = F.max_pool2d(x, 3, stride=1, padding=1)
    return (-F.max_pool2d(-F.pad(grown, (1, 1, 1, 1), value=1.0), 3, stride=1))[0, 0].numpy() > 0.5


def foreground(image: Image.Image, tol: float = FG_TOL, border: int = BORDER) -> np.ndarray:
    """Pixels of ``image`` whose colour is not the background's (the median of its frame), closed."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    frame = np.concatenate([px[:border].reshape(-1, 3), px[-border:].reshape(-1, 3),
                            px[:, :border].reshape(-1, 3), px[:, -border:].reshape(-1, 3)])
    return close3(np.linalg.norm(px - np.median(frame, axis=0), axis=-1) > tol)


def centroid(pixels: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(pixels)
    return None if not len(xs) else np.array([xs.mean(), ys.mean()]) / np.array(pixels.shape[::-1])


def follow_scores(image: Image.Image, mask: Image.Image) -> dict[str, float]:
    """How well ``image`` follows ``mask`` (see the module docstring): IoU and centroid error."""
    want = mask_pixels(mask)
    got = foreground(image.resize(mask.size, Image.BILINEAR) if image.size != mask.size else image)
    union = (want | got).sum()
    iou = float((want & got).sum() / union) if union else 1.0
    c_want, c_got = centroid(want), centroid(got)
    error = 1.0 if c_got is None or c_want is None else float(np.linalg.norm(c_got - c_want))
    return {"iou": iou, "centroid_error": error}


def follow_summary(scores: list[dict]) -> dict[str, float]:
    iou = np.array([s["iou"] for s in scores])
    err = np.array([s["centroid_error"] for s in scores])
    return {"iou_mean": float(iou.mean()), "iou_std": float(iou.std()), "hit_rate": float((iou >= 0.5).mean()),
            "centroid_error_mean": float(err.mean()), "centroid_error_std": float(err.std()), "images": len(iou)}


def paired(adapted: list[dict], base: list[dict]) -> dict[str, float]:
    d = np.array([a["iou"] - b["iou"] for a, b in zip(adapted, base)])
    return {"iou_gain_mean": float(d.mean()), "iou_gain_std": float(d.std()),
            "adapted_higher": int((d > 0.01).sum()), "adapted_lower": int((d < -0.01).sum()), "images": len(d)}


def train_control(out: Path, args) -> None:
    """train_controlnet.py at its embedded defaults into ``out`` (no data, no model: it renders
    its dataset into out/control_data)."""
    cmd = [sys.executable, str(CONTROLNET), "--output_dir", str(out), "--seed", str(args.seed), "--report_to", "none"]
    if args.steps:
        cmd += ["--max_train_steps", str(args.steps)]
    cmd += shlex.split(args.train_args)
    print(f"training the ControlNet: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def held_out_masks(out: Path, n: int, seed: int, size: int = 64) -> list[tuple]:
    """(caption, mask, scene) of ``n`` scenes drawn after the training ones for ``seed`` (distinct from
    them); refused unless out/control_data/metadata.jsonl (the training set the script wrote) holds
    exactly those training scenes."""
    import control_data  # train_scripts/control_data.py (on sys.path above)
    import train_controlnet

    rows = (out / train_controlnet.DATA_FOLDER / "metadata.jsonl").read_text().splitlines()
    trained = {world.Scene(**json.loads(r)["scene"]) for r in rows if r.strip()}
    scenes = control_data.sample_scenes(train_controlnet.EMBEDDED_SCENES + n, seed)
    scenes, training_set = scenes[train_controlnet.EMBEDDED_SCENES:], set(scenes[:train_controlnet.EMBEDDED_SCENES])
    if trained != training_set or trained & set(scenes):
        raise SystemExit(f"{out}: its training set is not the embedded default's for seed {seed} (--reuse of another run?)")
    return [(world.caption(s), control_data.conditioning_mask(s, size), s) for s in scenes]


@torch.no_grad()
def generate_controlled(pipe, held, seed: int, steps: int, batch: int = 8):
    images = []
    for i in range(0, len(held), batch):
        chunk = held[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe([t for t, _, _ in chunk], image=[m for _, m, _ in chunk], generator=gens,
                       num_inference_steps=steps, height=chunk[0][1].height, width=chunk[0][1].width).images
    return images


GRID_COLUMNS = ("mask", "base", "adapter off", "adapted")


def controlnet_grid(path: Path, held, samples: list[list], seed: int):
    """controlnet.png: one row per held-out (caption, mask, scene), columns GRID_COLUMNS: the mask,
    then ``samples`` (base, adapter off, adapted: one image per row each)."""
    rows = [("\n".join(textwrap.wrap(text, 40) + [f"seed {seed + i}"]), [mask] + [images[i] for images in samples])
            for i, (text, mask, _) in enumerate(held)]
    return sd_parts.labelled_grid(rows, path, size=96, label_width=260, columns=list(GRID_COLUMNS))


def controlnet_table(rows: dict, gains: dict[str, dict]) -> str:
    """The rows' summaries, then one line per paired comparison (``gains``: "adapted − base" -> paired())."""
    lines = ["| images from | IoU with the mask (mean ± std) | hit rate (IoU ≥ 0.5) | centroid error (mean ± std) |",
             "|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['iou_mean']:.3f} ± {s['iou_std']:.3f} | {s['hit_rate']:.2f} "
                     f"| {s['centroid_error_mean']:.3f} ± {s['centroid_error_std']:.3f} |")
    lines.append("")
    for label, g in gains.items():
        lines.append(f"{label} IoU, paired per image: {g['iou_gain_mean']:+.3f} ± {g['iou_gain_std']:.3f}; "
                     f"higher on {g['adapted_higher']}, lower on {g['adapted_lower']} of {g['images']} images "
                     "(a difference above 0.01)  ")
    return "\n".join(lines)


def controlnet_main(args) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    import train_controlnet  # train_scripts/train_controlnet.py: the ControlNet as its training starts

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    work, results_dir = Path(args.work_dir), Path(args.results_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "controlnet"
    if not (args.reuse and (out / "diffadapt_adapter.json").exists()):
        t0 = time.time()
        train_control(out, args)
        print(f"  trained in {time.time() - t0:.0f}s", flush=True)
    held = held_out_masks(out, args.images, args.seed)
    base_pipe = StableDiffusionPipeline.from_pretrained(da.default_model_path(), safety_checker=None,
                                                        requires_safety_checker=False)
    untrained = ControlNetModel.from_unet(base_pipe.unet, conditioning_embedding_out_channels=train_controlnet
                                          .conditioning_channels(base_pipe.vae_scale_factor))
    trained = ControlNetModel.from_pretrained(out / train_controlnet.CONTROLNET_FOLDER)
    before = StableDiffusionControlNetPipeline.from_pipe(base_pipe, controlnet=untrained)
    after = StableDiffusionControlNetPipeline.from_pipe(base_pipe, controlnet=trained)  # shares the UNet
    facts = json.loads((out / "diffadapt_adapter.json").read_text())["metadata"]
    seed = 1000 * args.seed  # generation seeds: seed, seed + 1, ... (the same for every model)
    samples = {"scenes (the held-out scenes' renders: the ceiling)": [world.render(s) for _, _, s in held]}
    loaded = False
    for name, pipe, strength in (("base: untrained ControlNet (= the base model)", before, None),
                                 ("trained ControlNet, adapter off (strength 0)", after, 0.0),
                                 (f"adapted: trained ControlNet + {facts['method']} (strength 1)", after, 1.0)):
        pipe.set_progress_bar_config(disable=True)
        if strength is not None:
            if not loaded:  # after the base images (an --adapt unet adapter lands on the shared UNet)
                da.load_adapter(after, str(out), "trained")
                loaded = True
            da.set_adapter_strength(pipe, "trained", strength)
        t0 = time.time()
        samples[name] = generate_controlled(pipe, held, seed, args.inference_steps)
        print(f"  {name}: {len(held)} images in {time.time() - t0:.0f}s", flush=True)
    scores = {name: [follow_scores(im, mask) for im, (_, mask, _) in zip(images, held)] for name, images in samples.items()}
    rows = {name: follow_summary(s) for name, s in scores.items()}
    names = list(samples)
    gains = {"adapted − base": paired(scores[names[3]], scores[names[1]]),
             "adapted − adapter off": paired(scores[names[3]], scores[names[2]])}
    report = controlnet_table(rows, gains)
    print(report)
    results_dir.mkdir(parents=True, exist_ok=True)
    controlnet_grid(results_dir / "controlnet.png", held[:args.grid_rows], [samples[n] for n in names[1:]], seed)
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "torch": torch.__version__, "args": vars(args), "adapter": facts, "rows": rows, "paired": gains,
        "per_image": {name: s for name, s in scores.items()},
        "held_out": [{"caption": text, "seed": seed + i} for i, (text, _, _) in enumerate(held)],
    }
    (results_dir / "controlnet.json").write_text(json.dumps(summary, indent=2))
    (results_dir / "controlnet.md").write_text(report + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the main job's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subject_images", type=int, default=16)
    p.add_argument("--drift_seeds", type=int, default=4, help="images per unrelated prompt")
    p.add_argument("--class_seeds", type=int, default=8, help="images of the class prompt")
    p.add_argument("--prior", choices=["off", "on", "both"], default="off",
                   help="train with prior preservation (class images generated by the base model), without, or both")
    p.add_argument("--num_class_images", type=int, default=100, help="class images for --prior on/both")
    p.add_argument("--prior_loss_weight", type=float, default=1.0, help="for --prior on/both")
    p.add_argument("--inference_steps", type=int, default=25)
    p.add_argument("--work_dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "diffadapt_quality"))
    p.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "quality"))
    p.add_argument("--score", nargs="+", default=None, help="score these trained adapter folders only (no training)")
    p.add_argument("--probe_steps", type=int, default=5000, help="probe training steps (fewer: a weaker probe)")
    p.add_argument("--probe_scenes", type=int, default=12000, help="rendered scenes the probe trains on")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the training runs (default: every core; 1 on a shared machine)")
    p.add_argument("--reuse", action="store_true",
                   help="skip training where <work_dir>/<method> (--controlnet: <work_dir>/controlnet) holds an adapter")
    p.add_argument("--train_args", default="",
                   help='more train_dreambooth.py flags, e.g. "--target_modules attn2.to_k,attn2.to_v"')
    p.add_argument("--strength", type=float, default=1.0, help="the trained adapters' strength when scored")
    p.add_argument("--controlnet", action="store_true",
                   help="ControlNet mode: train_controlnet.py's embedded default, then how well base and adapted "
                   "outputs follow held-out masks (controlnet.json/.md/.png in --results_dir)")
    p.add_argument("--images", type=int, default=64, help="--controlnet: held-out masks (one image each per model)")
    p.add_argument("--grid_rows", type=int, default=8, help="--controlnet: masks shown in controlnet.png")
    return p.parse_args(argv)


def main(args) -> None:
    if args.controlnet:
        return controlnet_main(args)
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    work, results_dir = Path(args.work_dir), Path(args.results_dir)
    work.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(da.default_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    probe, probe_acc = load_probe(work, pipe, args.probe_steps, args.probe_scenes)
    instance = world.subject_images(5, seed=args.seed)

    base = sample_all(pipe, args)
    rows = {"base model": {"samples": base, "scores": {
        **subject_scores(probe, base["subject"], instance), **drift_scores(probe, base["unrelated"], base["unrelated"]),
        **class_scores(probe, base["class"])}}}
    priors = {"off": [False], "on": [True], "both": [False, True]}[args.prior]
    if args.score:
        runs = [(None, Path(f), False) for f in args.score]
    else:
        runs = [(m, work / (f"{m}_prior" if prior else m), prior) for m in args.methods for prior in priors]
    for method, out, prior in runs:
        if method is not None and not (args.reuse and (out / "diffadapt_adapter.json").exists()):
            train(method, out, args, prior)
        da.load_adapter(pipe, str(out), "trained")
        da.set_adapter_strength(pipe, "trained", args.strength)
        facts = adapter_facts(out, pipe)
        samples = sample_all(pipe, args)
        da.delete_adapter(pipe, "trained")
        scores = {**subject_scores(probe, samples["subject"], instance), **drift_scores(probe, samples["unrelated"], base["unrelated"]),
                  **class_scores(probe, samples["class"])}
        name = out.name if method is None else facts["method"] + (f" + prior ({args.num_class_images} generated)" if prior else "")
        rows[name] = {"samples": samples, "scores": scores, "facts": facts}
        print(json.dumps({"adapter": str(out), **facts, **scores}), flush=True)

    report = table(rows)
    print(report)
    if args.score:
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    grids(results_dir, instance, rows)
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "torch": torch.__version__, "probe_accuracy": probe_acc, "args": vars(args),
        "rows": {name: {"scores": r["scores"], "facts": r.get("facts", {})} for name, r in rows.items()},
    }
    (results_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (results_dir / "results.md").write_text(report + "\n")


if __name__ == "__main__":
    main(parse_args())
