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

Offline, CPU: ~12 min for the five methods on 2 cores (the probe, trained once and cached, ~8 min more).
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
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))
import sd_parts  # noqa: E402  (train_scripts/sd_parts.py: labelled_grid)

import diffadapt as da  # noqa: E402
from diffadapt.embedded import world  # noqa: E402

DREAMBOOTH = ROOT / "train_scripts" / "train_dreambooth.py"
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
            "file_bytes": sum(f.stat().st_size for f in out.rglob("adapter_model.safetensors")),
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
    p.add_argument("--reuse", action="store_true", help="skip training where <work_dir>/<method> holds an adapter")
    p.add_argument("--train_args", default="",
                   help='more train_dreambooth.py flags, e.g. "--target_modules attn2.to_k,attn2.to_v"')
    p.add_argument("--strength", type=float, default=1.0, help="the trained adapters' strength when scored")
    return p.parse_args(argv)


def main(args) -> None:
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
