#!/usr/bin/env python
"""DreamBooth fine-tuning with diffadapt adapters (FourierFT, BOFT, OFT, HRA, FRoD).

Follows diffusers' examples/dreambooth/train_dreambooth_lora{,_sdxl,_sd3,_flux,_flux2,_qwen_image,
_sana}.py: the same flag names (so commands carry over), accelerate from one device to many, prior
preservation, checkpoints and resume, validation images. Families, told by model_index.json's
_class_name (train_scripts/families.py): SD 1.x/2.x and SDXL (UNet; epsilon or v-prediction from
the scheduler config), SD3/SD3.5, Flux.1, Flux.2, Qwen-Image and Sana (flow matching); any other
pipeline is refused at start.

    accelerate launch train_scripts/train_dreambooth.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --method boft --boft_block_size 8 --boft_n_butterfly_factor 2 \\
      --resolution 512 --train_batch_size 1 --max_train_steps 500 --output_dir dog-boft

Without --pretrained_model_name_or_path the small model embedded in diffadapt is used, and
without --instance_data_dir its bundled DreamBooth subject (diffadapt.world): the main job, which
also trains the text encoder and distils against the frozen base on built-in prompts by default
(--no-train_text_encoder, --preservation_weight 0 turn them off).

The output folder holds the adapter as a diffadapt pipeline artifact (load it with
``diffadapt.load_adapter(pipe, output_dir)``), README.md (model card), validation grids under
validation/, train_log.jsonl and the resumable checkpoint-<step> folders.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import atomic_io  # noqa: E402
import common  # noqa: E402
import families  # noqa: E402
import sd_parts  # noqa: E402
import training_loop  # noqa: E402
from common import UsageError  # noqa: E402

# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = common.Parser(description=__doc__.split("\n\n")[0])
    common.add_model_args(parser)
    g = parser.add_argument_group("DreamBooth data")
    g.add_argument("--instance_data_dir", default=None, help="Folder of instance images.")
    g.add_argument("--instance_prompt", default=None, help='Prompt with the identifier, e.g. "a photo of sks dog".')
    g.add_argument("--class_data_dir", default=None, help="Folder of class images (generated if too few).")
    g.add_argument("--class_prompt", default=None, help='Prompt of the class, e.g. "a photo of dog".')
    g.add_argument("--with_prior_preservation", action="store_true", help="Add the prior preservation loss.")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100,
                   help="Class images for prior preservation; missing ones are generated with the base model.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    g.add_argument("--class_prompts_file", default=None,
                   help="Broad prior preservation: a text file of prompts, one a line. Missing class images are "
                   "generated for these prompts in turn (instead of for --class_prompt alone), each written with its "
                   "prompt beside it (<image>.txt), and every class image with such a caption file trains with its "
                   "own prompt: the prior then keeps what the prompts cover (say, the kinds of prompt the model "
                   "should go on drawing as before), not only the class. Images without one use --class_prompt.")
    g = parser.add_argument_group("output distillation (preservation against the frozen base)")
    g.add_argument("--preservation_prompts_file", default=None,
                   help="A text file of prompts, one a line (the kinds of prompt the model should go on drawing as "
                   "before; not the ones you evaluate on). Each step adds --preservation_weight x the mean squared "
                   "difference between the adapted model's prediction and the frozen base model's (adapters off, no "
                   "gradient; with --train_text_encoder the base prediction also uses the base text encoder) for as "
                   "many of its prompts, drawn at random, as the batch has rows, on the batch's latents noised again "
                   "at fresh timesteps. With the embedded default model and its bundled subject (the main job), a "
                   "built-in set of world captions is used without a file, at weight EMBEDDED_PRESERVATION_WEIGHT (4).")
    g.add_argument("--preservation_weight", type=float, default=None,
                   help="Weight of the output-distillation loss (default 1 with --preservation_prompts_file, 4 in the "
                   "main job, else off; 0: off).")
    g.add_argument("--validation_prompt", default=None, help="Prompt for validation images (off if not given).")
    g.add_argument("--comparison_prompts", nargs="+", default=None,
                   help="At the end, write <output_dir>/before_after.png: one row per prompt, columns at adapter "
                   "strength 0 (the base model), 0.5 and 1, --num_validation_images images each from the same seeds "
                   "(embedded default: the instance prompt, the class prompt and two unrelated prompts).")
    g.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="Also adapt the CLIP text encoder(s) (SD/Flux.1: text_encoder; SDXL/SD3: both CLIP encoders; "
                   "the language-model encoders of Flux.2, Qwen-Image and Sana stay frozen). Default: on in the main "
                   "job (the embedded model with its bundled subject), else off; --no-train_text_encoder: off.")
    g.add_argument("--text_encoder_lr", type=float, default=None, help="Text encoder lr (default: --learning_rate).")
    g.add_argument("--text_encoder_target_modules", default=None,
                   help="Text-encoder layers (like --target_modules); default: the same preset.")
    g = parser.add_argument_group("flow matching (SD3, Flux.1/2, Qwen-Image, Sana)")
    g.add_argument("--weighting_scheme", default="none",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="Guidance embedding value while training (Flux.1/2; default: the pipeline's, 3.5 / 4).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="Prompt tokens (default: the pipeline's; SD3 77, Flux.1/2 512, Qwen-Image 1024, Sana 300).")
    g.add_argument("--complex_human_instruction", default=None,
                   help='Sana: the instruction before each prompt, lines separated by newlines, or "none" '
                   "(default: the pipeline's, as generation uses it).")
    common.add_training_args(parser, output_dir="dreambooth-diffadapt")
    common.add_adapter_args(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="Every library log (model loading, configs, per-phase details); default: progress bars "
                        "and the lines that say where the output went.")
    args = parser.parse_args(argv)

    if args.pretrained_model_name_or_path is None:  # the embedded model: its own defaults
        args.method = args.method or EMBEDDED_METHOD
        if args.learning_rate is None:
            args.learning_rate = common.get_method(args.method).embedded_learning_rate
    common.check_common_args(args)
    use_embedded_defaults(args)
    if args.instance_data_dir is None:
        raise UsageError("--instance_data_dir is required (it may only be left out with the embedded default model).")
    if not os.path.isdir(args.instance_data_dir):
        raise UsageError(f"--instance_data_dir {args.instance_data_dir} does not exist.")
    if not sd_parts.list_images(args.instance_data_dir):
        raise UsageError(f"--instance_data_dir {args.instance_data_dir} holds no images (png, jpg, jpeg, webp, bmp).")
    if args.instance_prompt is None:
        raise UsageError("--instance_prompt is required.")
    if args.with_prior_preservation:
        if args.class_data_dir is None or (args.class_prompt is None and args.class_prompts_file is None):
            raise UsageError("--with_prior_preservation needs --class_data_dir and --class_prompt "
                             "(or --class_prompts_file).")
        if args.class_prompts_file is not None:
            class_prompts(args)  # a missing or empty file: refused before anything loads
    elif args.class_data_dir or args.class_prompt or args.class_prompts_file:
        print("warning: --class_data_dir / --class_prompt / --class_prompts_file are ignored without "
              "--with_prior_preservation.", file=sys.stderr)
    args.train_text_encoder = bool(args.train_text_encoder)  # None (not given, not the main job): off
    check_preservation(args)
    return args


def check_preservation(args) -> None:
    """--preservation_weight / --preservation_prompts_file: refused in one line when they cannot work;
    the prompts are read here (a missing, empty, oversized or undecodable file fails before anything loads)."""
    weight = args.preservation_weight
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise UsageError(f"--preservation_weight {weight}: must be a finite number >= 0.")
    if args.preservation_prompts_file is not None:
        args.preservation_weight = 1.0 if weight is None else weight
        args.preservation_prompts = read_prompts_file("--preservation_prompts_file", args.preservation_prompts_file)
    elif weight:
        if not args.embedded_subject:
            raise UsageError(f"--preservation_weight {weight} needs --preservation_prompts_file (a built-in prompt "
                             "set exists only for the embedded default model with its bundled subject).")
        args.preservation_prompts = embedded_preservation_prompts()
    else:
        args.preservation_prompts = None
    if not args.preservation_weight:
        args.preservation_weight, args.preservation_prompts = 0.0, None




# The main job (no model, no data): what it trains unless told otherwise. Chosen from the quality
# table in benchmarks/RESULTS.md (fidelity vs drift on the embedded model, 2 CPU cores).
EMBEDDED_METHOD = "hra"  # kept unrelated prompts best with the preservation defaults, 3 seeds
EMBEDDED_STEPS = 800
# Learning rates for the embedded model: each method's embedded_learning_rate (diffadapt/methods/,
# from a sweep at 800 steps, benchmarks/RESULTS.md "Quality"; FourierFT at 1e-2 drifts everywhere).


def use_embedded_defaults(args) -> None:
    """The embedded default model and its bundled subject: the only glue to diffadapt.world.

    No --pretrained_model_name_or_path: use the embedded model (and, unless given, --method
    EMBEDDED_METHOD and --learning_rate its embedded_learning_rate: see parse_args). If additionally no
    --instance_data_dir: write the bundled subject images into <output_dir>/instance_images,
    default the prompts to the world's instance / class prompts (the comparison prompts to
    those and two unrelated ones: the before/after grid stands in for periodic validation),
    the class images folder to <output_dir>/class_images, --max_train_steps to EMBEDDED_STEPS
    and --seed to 0, and keep the rest of the model: --train_text_encoder on and, without a
    --preservation_prompts_file, --preservation_weight EMBEDDED_PRESERVATION_WEIGHT (the built-in
    prompts, see check_preservation)."""
    args.embedded_subject = False
    if args.pretrained_model_name_or_path is not None:
        return
    args.pretrained_model_name_or_path = common.embedded_model_path()
    if args.instance_data_dir is not None:
        return
    args.embedded_subject = True
    from diffadapt.embedded import world

    if args.seed is None:  # the main job is reproducible: the same adapter and grid on every machine
        args.seed = 0
    folder = Path(args.output_dir, "instance_images")
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(world.subject_images(5, seed=args.seed)):
        target = folder / f"subject_{i:02d}.png"
        tmp = folder / f".subject_{i:02d}.{os.getpid()}.png"  # several processes may write at once
        image.save(tmp)
        os.replace(tmp, target)
    args.instance_data_dir = str(folder)
    args.instance_prompt = args.instance_prompt or world.INSTANCE_PROMPT
    if args.with_prior_preservation:  # (set without it, parse_args would warn that it is ignored)
        args.class_prompt = args.class_prompt or world.CLASS_PROMPT
        args.class_data_dir = args.class_data_dir or str(Path(args.output_dir, "class_images"))
    if args.comparison_prompts is None:
        args.comparison_prompts = [args.instance_prompt, args.class_prompt or world.CLASS_PROMPT,
                                   *world.UNRELATED_PROMPTS[:2]]
    if args.max_train_steps is None:
        args.max_train_steps = EMBEDDED_STEPS
    if args.train_text_encoder is None:
        args.train_text_encoder = True
    if args.preservation_weight is None and args.preservation_prompts_file is None:
        args.preservation_weight = EMBEDDED_PRESERVATION_WEIGHT


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


MAX_PROMPTS_FILE_BYTES = 1 << 20  # a prompts file / a caption is text, not data: refuse anything bigger
MAX_CAPTION_BYTES = 1 << 16


def class_prompts(args) -> list[str]:
    """The prompts class images are generated for: --class_prompts_file's lines, else --class_prompt."""
    if args.class_prompts_file is None:
        return [args.class_prompt]
    return read_prompts_file("--class_prompts_file", args.class_prompts_file)


def read_prompts_file(flag: str, path) -> list[str]:
    """A prompts file's non-blank lines, stripped; a missing, oversized, undecodable or empty file: one UsageError."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_PROMPTS_FILE_BYTES:
            raise UsageError(f"{flag} {path} is {size} bytes; prompts files are "
                             f"at most {MAX_PROMPTS_FILE_BYTES} bytes (one prompt a line).")
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"{flag} {path} holds no prompt.")
    return prompts


# The main job's output distillation (benchmarks/RESULTS.md, "Quality: the main job keeps the rest of the
# model"): weight 4 on the built-in prompts with the text encoder trained too kept prompt accuracy on the
# unrelated prompts near the base model's with the subject learnt; weight 8 / 16 did not keep more.
EMBEDDED_PRESERVATION_WEIGHT = 4.0
EMBEDDED_PRESERVATION_PROMPTS = 256  # the built-in preservation set of the embedded default
EMBEDDED_PRESERVATION_SEED = 20261202
EMBEDDED_PRESERVATION_CLASS_EVERY = 4  # every 4th built-in preservation prompt is the class prompt


def embedded_preservation_prompts(n: int = EMBEDDED_PRESERVATION_PROMPTS,
                                  seed: int = EMBEDDED_PRESERVATION_SEED) -> list[str]:
    """The embedded default's output-distillation prompts: every ``EMBEDDED_PRESERVATION_CLASS_EVERY``-th
    the class prompt (DreamBooth's prior: "a photo of a hexagon" keeps drawing the base model's
    hexagons, so the identifier has to carry the subject; without it the class prompt turned into
    the subject, benchmarks/RESULTS.md), the others varied world captions (random pretraining scenes,
    paraphrased). Held out, so that benchmarks/quality.py's drift scores measure generalisation: no
    scene with the shape and colour of one of ``world.UNRELATED_PROMPTS`` (the scored prompts), none
    with the subject's look (purple and striped), never the instance prompt."""
    import random

    from diffadapt.embedded import world

    scored = set()
    for prompt in world.UNRELATED_PROMPTS:
        words = prompt.split()
        scored.add((next(w for w in words if w in world.SHAPES), next(w for w in words if w in world.COLORS)))
    rng, out = random.Random(seed), []
    while len(out) < n:
        if len(out) % EMBEDDED_PRESERVATION_CLASS_EVERY == EMBEDDED_PRESERVATION_CLASS_EVERY - 1:
            out.append(world.CLASS_PROMPT)
            continue
        scene = world.sample_scene(rng)
        if (scene.shape, scene.color) in scored or (scene.color, scene.texture) == ("purple", "striped"):
            continue
        text = world.caption(scene, rng)
        if text not in (world.INSTANCE_PROMPT, world.CLASS_PROMPT):
            out.append(text)
    return out


def prior_description(args) -> str:
    """The model card's words for the prior: the class prompt, or how many prompts of which file."""
    if args.class_prompts_file is None:
        return f"`{args.class_prompt}`"
    return f"{len(class_prompts(args))} prompts (`{os.path.basename(args.class_prompts_file)}`)"


def caption_of(path: Path, default: str | None) -> str | None:
    """A class image's own prompt (<image>.txt beside it, as generate_class_images writes it), else ``default``."""
    text = Path(path).with_suffix(".txt")
    if not text.is_file():
        return default
    if text.stat().st_size > MAX_CAPTION_BYTES:
        raise UsageError(f"{text}: a caption file of {text.stat().st_size} bytes (at most {MAX_CAPTION_BYTES}).")
    try:
        return text.read_text().strip()
    except UnicodeDecodeError as error:
        raise UsageError(f"{text}: not a text caption ({error}).") from None


class DreamBoothDataset:
    """Instance images with the instance prompt, paired (prior preservation) with class images."""

    def __init__(self, args, seed: int):
        self.args, self.seed, self.epoch = args, seed, 0
        self.instance = sd_parts.list_images(args.instance_data_dir)
        self.classes = []
        if args.with_prior_preservation:
            self.classes = sd_parts.list_images(args.class_data_dir)[: args.num_class_images]
        self.class_prompts = [caption_of(p, args.class_prompt) for p in self.classes]
        if None in self.class_prompts:
            raise UsageError(f"{self.classes[self.class_prompts.index(None)]}: a class image without a caption "
                             "file (<image>.txt) needs --class_prompt.")
        self.length = max(len(self.instance), len(self.classes))

    def __len__(self):
        return self.length

    def _view(self, path, rng):
        a = self.args
        (img,), original, crop = sd_parts.resize_crop_flip(
            [sd_parts.load_rgb(path)], a.resolution, a.center_crop, a.random_flip, rng
        )
        return sd_parts.to_tensor(img), original, crop

    def __getitem__(self, index):
        rng = sd_parts.item_rng(self.seed, self.epoch, index)
        pixels, original, crop = self._view(self.instance[index % len(self.instance)], rng)
        item = {"pixels": [pixels], "prompts": [self.args.instance_prompt], "original": [original], "crop": [crop]}
        if self.classes:
            j = index % len(self.classes)
            pixels, original, crop = self._view(self.classes[j], rng)
            item = {k: v + [x] for (k, v), x in zip(item.items(), (pixels, self.class_prompts[j], original, crop))}
        return item


def collate(examples):
    """Instance examples first, then class examples (the loss splits the batch in two halves)."""

    parts = max(len(e["pixels"]) for e in examples)
    order = [(e, j) for j in range(parts) for e in examples]
    return {
        "pixel_values": torch.stack([e["pixels"][j] for e, j in order]),
        "prompts": [e["prompts"][j] for e, j in order],
        "original_sizes": [e["original"][j] for e, j in order],
        "crops_top_left": [e["crop"][j] for e, j in order],
    }


@contextlib.contextmanager
def adapters_off(pipe):
    """The frozen base model inside the block: every adapted component's adapters disabled
    (``diffadapt.disable_adapters``), enabled again after."""
    import diffadapt as da

    da.disable_adapters(pipe)
    try:
        yield
    finally:
        da.enable_adapters(pipe)


def draw_prompts(prompts: list[str], n: int, generator) -> list[str]:
    """``n`` prompts drawn at random (with replacement) with the step's generator: a resumed run draws the same."""
    index = torch.randint(len(prompts), (n,), generator=generator, device=generator.device)
    return [prompts[i] for i in index.tolist()]


def preservation_loss(denoising, pipe, latents, prompts, batch, generator, encode_adapted, encode_base):
    """Output distillation against the frozen base: mean over elements of
    (adapted prediction - base prediction)^2 for ``prompts`` (one per row of ``latents``) on
    ``latents`` noised again (fresh noise and timesteps from ``generator``, the same for both).

    The base prediction runs with every adapter disabled (so with the base text encoder too, when
    it is trained: ``encode_base`` runs inside the same block) and without gradient; the adapted
    one is ``encode_adapted`` + the training denoiser, with gradient. At the adapter's
    initialisation (the base model) the term is exactly zero."""
    state = generator.get_state()
    with torch.no_grad(), adapters_off(pipe):
        base, _, _ = denoising.predict(latents, encode_base(prompts), batch, generator)
    after = generator.get_state()
    generator.set_state(state)  # the same noise and timesteps for the adapted prediction
    adapted, _, _ = denoising.predict(latents, encode_adapted(prompts), batch, generator)
    generator.set_state(after)
    return ((adapted.float() - base.float()) ** 2).mean()


def generate_class_images(args, pipe, accelerator, family) -> None:
    """Fill --class_data_dir up to --num_class_images with images of the base model (adapters
    are switched off meanwhile); the processes split the work. Image i is of class_prompts(args)[i
    modulo their number]; with --class_prompts_file its prompt is written beside it (<image>.txt)."""

    import diffadapt as da

    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(sd_parts.list_images(folder))
    missing = list(range(have, args.num_class_images))
    if not missing:
        return
    if training_loop.verbose(args):
        accelerator.print(f"Generating {len(missing)} class images for prior preservation.")
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    prompts = class_prompts(args)
    da.disable_adapters(pipe)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(mine), desc="Class images", unit="image", disable=not accelerator.is_local_main_process)
    try:
        for start in range(0, len(mine), args.sample_batch_size):
            chunk = mine[start : start + args.sample_batch_size]
            gens = [torch.Generator(accelerator.device).manual_seed(args.seed_value + i) for i in chunk]
            with torch.no_grad(), training_loop.autocast(accelerator):
                images = pipe(prompt=[prompts[i % len(prompts)] for i in chunk], generator=gens,
                              **pipeline_call_kwargs(args, family)).images
            for i, image in zip(chunk, images):
                if args.class_prompts_file is not None:  # the caption first: an image is only counted once saved
                    atomic_io.write_text_atomic(folder / f"generated_{i:05d}.txt", prompts[i % len(prompts)] + "\n")
                image.save(folder / f"generated_{i:05d}.png")
            bar.update(len(chunk))
    finally:
        bar.close()
        da.enable_adapters(pipe)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def pipeline_call_kwargs(args, family) -> dict:
    """The pipeline call of validation and class images: --num_inference_steps at --resolution,
    with the family's prompt settings (train_scripts/families.py)."""
    return {"num_inference_steps": args.num_inference_steps, "height": args.resolution, "width": args.resolution,
            **family.call(args)}


def validate(args, accelerator, pipe, family, tag: str, step: int) -> str:
    """--num_validation_images for --validation_prompt, saved as one grid PNG; returns its path."""

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed_value)
    with torch.no_grad(), training_loop.autocast(accelerator):
        images = [pipe(prompt=args.validation_prompt, generator=generator, **pipeline_call_kwargs(args, family)).images[0]
                  for _ in range(args.num_validation_images)]
    sd_parts.log_images(accelerator, tag, images, step)
    return sd_parts.save_grid(images, Path(args.output_dir, "validation", f"{tag}.png"))


GRID_STRENGTHS = (0.0, 0.5, 1.0)  # before_after.png's columns: 0 is the base model exactly


def strength_label(strength: float) -> str:
    return "base (strength 0)" if strength == 0 else f"strength {strength:g}"


def before_after(args, accelerator, pipe, family) -> str:
    """before_after.png: one row per --comparison_prompts, one column group per GRID_STRENGTHS
    (the adapter's strength, set with ``diffadapt.set_adapters``; 0 is the base model), each
    --num_validation_images images from the same seeds in every column; returns its path."""

    import diffadapt as da

    pipe.set_progress_bar_config(disable=True)
    n, rows = args.num_validation_images, []
    bar = tqdm(total=len(args.comparison_prompts) * len(GRID_STRENGTHS), desc="Grid", unit="cell",
               disable=not accelerator.is_local_main_process)
    try:
        for prompt in args.comparison_prompts:
            images = []
            for strength in GRID_STRENGTHS:
                da.set_adapters(pipe, common.ADAPTER_NAME, strength)
                gens = [torch.Generator(accelerator.device).manual_seed(args.seed_value + i) for i in range(n)]
                with torch.no_grad(), training_loop.autocast(accelerator):
                    images += pipe(prompt=[prompt] * n, generator=gens, **pipeline_call_kwargs(args, family)).images
                bar.update(1)
            seeds = f"seed {args.seed_value}" if n == 1 else f"seeds {args.seed_value}-{args.seed_value + n - 1}"
            rows.append((f"{prompt}\n{seeds}", images))
    finally:
        bar.close()
        da.set_adapters(pipe, common.ADAPTER_NAME, 1.0)
    path = Path(args.output_dir, "before_after.png")
    sd_parts.labelled_grid(rows, path, size=max(args.resolution, 128), columns=[strength_label(s) for s in GRID_STRENGTHS])
    return str(path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


@common.guarded
def main(argv=None):
    args = parse_args(argv)
    training_loop.quiet_library_logs(args)  # before diffusers is imported
    family, class_name = common.pipeline_family(args, families.FAMILIES, "train_dreambooth.py", families.SUPPORTED)
    if args.train_text_encoder and not family.trainable_text:
        raise UsageError(f"--train_text_encoder: {family.title}'s text encoder stays frozen in train_dreambooth.py "
                         "(it adapts the CLIP encoders of SD 1.x/2.x, SDXL, SD3 and Flux.1).")
    if args.max_sequence_length is None:
        args.max_sequence_length = family.max_sequence_length
    config = common.adapter_config(args, common.parse_targets(args.target_modules))  # field validation
    training_loop.find_resume(args)  # a missing or damaged checkpoint: refused before anything loads

    from accelerate.logging import get_logger
    from diffusers.training_utils import cast_training_params, free_memory

    import diffadapt as da

    accelerator = training_loop.make_accelerator(args, find_unused_parameters=family.unused_layers)
    logger = get_logger(__name__)
    # -- models, then adapters: a config that does not fit the layers fails here, before any data
    pipe = training_loop.start_run(args, accelerator, family.name)
    denoiser_name = family.denoiser
    denoiser = getattr(pipe, denoiser_name)
    if args.resolution is None:
        args.resolution = int(denoiser.config.get("sample_size") or 128) * pipe.vae_scale_factor
    multiple = family.patch * pipe.vae_scale_factor
    if family.flow and args.resolution % multiple:
        raise UsageError(f"--resolution {args.resolution}: {class_name} needs a multiple of {multiple} "
                         f"({family.patch}x{family.patch} latent patches).")
    preset = args.target_preset
    models = {denoiser_name: denoiser}
    training_loop.quantize_base(args, accelerator, pipe, [denoiser_name], family.text_stack)  # before the adapters
    common.inject(denoiser, config, preset, denoiser_name)
    text_roles = family.trainable_text if args.train_text_encoder else ()
    te_targets = common.parse_targets(args.text_encoder_target_modules)
    for role in text_roles:
        te_config = common.adapter_config(args, te_targets)
        common.inject(getattr(pipe, role), te_config, preset if te_targets is None else None, role)
        models[role] = getattr(pipe, role)
    training_loop.check_resume(args, models)  # another run's checkpoint: refused before any work
    trainable = {role: da.count_parameters(m)[0] for role, m in models.items()}
    logger.info(f"{args.method} adapters, trainable parameters: {trainable}", main_process_only=True)
    if not training_loop.verbose(args):
        base = ("the embedded default model" if sd_parts.is_embedded(args.pretrained_model_name_or_path)
                else args.pretrained_model_name_or_path)
        steps = f" for {args.max_train_steps} steps" if args.max_train_steps else ""
        accelerator.print(f"Training a {args.method} adapter ({', '.join(f'{r}: {n:,}' for r, n in trainable.items())} "
                          f"parameters) on {base}{steps}, into {args.output_dir}")

    # -- devices and dtypes: frozen weights in the mixed-precision dtype, trained tensors in fp32
    dtype = training_loop.weight_dtype(accelerator)
    pipe.vae.to(accelerator.device).requires_grad_(False)
    for module in [getattr(pipe, n, None) for n in family.text_stack] + [denoiser]:
        if module is not None:
            training_loop.to_device(module, accelerator.device, dtype)
            if module not in models.values():
                module.requires_grad_(False)
    cast_training_params(list(models.values()), dtype=torch.float32)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for role in text_roles:
            models[role].gradient_checkpointing_enable()

    # -- data
    if args.with_prior_preservation:
        generate_class_images(args, pipe, accelerator, family)
    dataset = DreamBoothDataset(args, args.seed_value)
    sampler = training_loop.EpochSampler(len(dataset), args.seed_value)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=args.dataloader_num_workers)

    # -- optimizer, schedule, accelerate
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    groups = [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": args.learning_rate}]
    for role in text_roles:
        groups.append({"params": [p for p in models[role].parameters() if p.requires_grad],
                       "lr": args.text_encoder_lr or args.learning_rate})
    wrapped, optimizer, dataloader, lr_scheduler, steps_per_epoch = training_loop.prepare(
        accelerator, args, models, groups, dataloader)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-diffadapt", config={k: str(v) for k, v in vars(args).items()})

    encoders = [wrapped.get(n, getattr(pipe, n, None)) for n in family.text_stack]
    tokenizers = [getattr(pipe, n.replace("text_encoder", "tokenizer"), None) for n in family.text_stack]
    denoising = families.Denoising(family, args, pipe, wrapped[denoiser_name], dtype)
    cache: dict[tuple[str, ...], dict] = {}  # per batch of prompts (a few: instance and class prompts, in order)
    CACHED_PROMPT_BATCHES = 64

    def conditioning(prompts):
        if text_roles:  # trained: encode every batch, with gradients
            return family.encode(pipe, encoders, tokenizers, prompts, args, accelerator.device)
        key = tuple(prompts)
        if key not in cache:  # the whole batch at once: padding as the pipeline pads a batch of prompts
            with torch.no_grad():
                encoded = family.encode(pipe, encoders, tokenizers, prompts, args, accelerator.device)
            if len(cache) >= CACHED_PROMPT_BATCHES:  # many prompts (--class_prompts_file): encode each time
                return encoded
            cache[key] = encoded
        return cache[key]

    def frozen_conditioning(prompts):  # the base text encoder (adapters off in preservation_loss), no gradient
        with torch.no_grad():
            return family.encode(pipe, encoders, tokenizers, prompts, args, accelerator.device)

    def loss_fn(batch, generator):
        latents = denoising.latents(batch["pixel_values"].to(accelerator.device), generator)
        pred, target, t = denoising.predict(latents, conditioning(batch["prompts"]), batch, generator)
        if not args.with_prior_preservation:
            loss = denoising.loss(pred, target, t)
        else:
            half = pred.shape[0] // 2  # instance examples first, class examples second (see collate)
            prior = denoising.loss(pred[half:], target[half:], t[half:])
            loss = denoising.loss(pred[:half], target[:half], t[:half]) + args.prior_loss_weight * prior
        if args.preservation_weight:  # output distillation against the frozen base (--preservation_*)
            prompts = draw_prompts(args.preservation_prompts, latents.shape[0], generator)
            if text_roles:  # adapted: the trained text encoder, with gradient; base: adapters off, none
                encode_adapted, encode_base = (
                    lambda p: family.encode(pipe, encoders, tokenizers, p, args, accelerator.device)), frozen_conditioning
            else:  # a frozen text encoder: one encoding serves both
                cond = frozen_conditioning(prompts)
                encode_adapted = encode_base = lambda p: cond
            loss = loss + args.preservation_weight * preservation_loss(
                denoising, pipe, latents, prompts, batch, generator, encode_adapted, encode_base)
        return loss

    grids = []

    def validate_fn(step):
        grids.append(validate(args, accelerator, pipe, family, f"step_{step:06d}", step))

    logger.info(f"{len(dataset)} examples, {steps_per_epoch} updates per epoch, {args.max_train_steps} updates, "
                f"batch {args.train_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes}",
                main_process_only=True)
    global_step = training_loop.train(
        accelerator, args, models=models, wrapped=wrapped, optimizer=optimizer, lr_scheduler=lr_scheduler,
        dataloader=dataloader, steps_per_epoch=steps_per_epoch, epoch_users=[sampler, dataset], loss_fn=loss_fn,
        validate_fn=validate_fn if args.validation_prompt else None,
    )

    # -- the artifact, once, on the main process
    saved = False
    if accelerator.is_main_process:
        metadata = {"base_model": args.pretrained_model_name_or_path, "instance_prompt": args.instance_prompt,
                    "method": args.method, "family": family.name, "train_text_encoder": bool(text_roles),
                    "resolution": args.resolution, "steps": global_step}
        atomic_io.publish_artifact(  # into a temporary folder first: a kill leaves no half-written files
            args.output_dir, lambda folder: da.save_adapter(pipe, folder, common.ADAPTER_NAME, metadata=metadata))
        saved = True
        if args.validation_prompt or args.comparison_prompts:  # from the saved files, as users will load them
            free_memory()
            final = training_loop.load_pipeline(args, family.name)
            training_loop.quantize_base(args, accelerator, final, [denoiser_name], family.text_stack, pin=False)
            da.load_adapter(final, args.output_dir, common.ADAPTER_NAME)
            final.to(accelerator.device)
            if args.validation_prompt:
                grids.append(validate(args, accelerator, final, family, "final", global_step))
            if args.comparison_prompts:
                grids.append(before_after(args, accelerator, final, family))
        folder = os.path.basename(os.path.normpath(args.output_dir))  # the card travels with the folder
        usage = f"""
import diffadapt as da
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({sd_parts.base_model_code(args.pretrained_model_name_or_path)})
da.load_adapter(pipe, {folder!r})  # this folder
da.set_adapters(pipe, {common.ADAPTER_NAME!r}, 1.0)  # strength: 0 = base model, 1 = as trained
image = pipe({args.instance_prompt!r}).images[0]
"""
        sd_parts.write_model_card(
            args, title=f"DreamBooth {args.method} - {args.instance_prompt}",
            tags=["dreambooth", "text-to-image", family.name], base_model=args.pretrained_model_name_or_path,
            usage=usage, config=sd_parts.card_config(config, preset), trainable=trainable,
            extra=f"Instance prompt: `{args.instance_prompt}`."
            + (f" Prior preservation with {prior_description(args)}." if args.with_prior_preservation else "")
            + (f" Output distillation against the base model (weight {args.preservation_weight:g}) on "
               f"{len(args.preservation_prompts)} prompts." if args.preservation_weight else "") + "\n",
            images=[os.path.relpath(g, args.output_dir) for g in grids],
        )
        print_done(args, grids)
    if args.debug_rank_digest:
        training_loop.write_rank_digest(accelerator, args, models, saved)
    accelerator.end_training()


def print_done(args, grids) -> None:
    """The lines a user needs at the end: where the output went, how to use it."""
    grid = next((g for g in grids if Path(g).name == "before_after.png"), None)
    shown = ", before_after.png (adapter strength 0 / 0.5 / 1)" if grid else ""
    print(f"Saved the adapter, its model card README.md{shown} to {args.output_dir}", flush=True)
    model = "" if sd_parts.is_embedded(args.pretrained_model_name_or_path) else (
        f" --model {shlex.quote(str(args.pretrained_model_name_or_path))}")
    print(f"Generate with it: diffadapt generate{model} --adapter {shlex.quote(str(args.output_dir))}:1.0 "
          f"--prompt {shlex.quote(args.instance_prompt)} -o {shlex.quote(args.method)}.png", flush=True)


if __name__ == "__main__":
    main()
