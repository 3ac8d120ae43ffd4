#!/usr/bin/env python
"""Controllable generation with diffadapt adapters: a ControlNet branch on SD 1.x/2.x or SDXL.

The setup of the BOFT/OFT papers' controllable-generation experiments in diffusers terms: a
ControlNet branch (new from the UNet, ``ControlNetModel.from_unet``, or a given one) whose
attention layers carry a diffadapt adapter (``--adapt controlnet``, the default), or the
UNet's (``--adapt unet``), or both (``--adapt unet,controlnet``). Flags follow diffusers'
examples/controlnet/train_controlnet.py; conventions (checkpoints, resume, validation,
accelerate) are those of train_dreambooth.py.

Dataset folder (``--train_data_dir``), like diffusers' imagefolder with a metadata file::

    data/
      metadata.jsonl          one JSON object per line:
                              {"image": "images/0001.png",
                               "conditioning_image": "conditioning_images/0001.png",
                               "text": "a red circle on a blue background"}
      images/0001.png ...
      conditioning_images/0001.png ...

Paths are relative to the folder; the keys are set by --image_column,
--conditioning_image_column and --caption_column.

Without --pretrained_model_name_or_path the small model embedded in diffadapt is used (and, unless
given, --method EMBEDDED_METHOD with its embedded learning rate); without --train_data_dir as well,
a dataset is rendered from diffadapt's shape world into <output_dir>/control_data (conditioning
image: the object's filled mask, white on black; image: the scene; text: its caption, in the spirit
of fill50k) and <output_dir>/before_after.png shows held-out masks, the base and the adapted output.

    accelerate launch train_scripts/train_controlnet.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir fill50k --method oft --oft_block_size 32 --resolution 512 \\
      --validation_prompt "red circle with blue background" --validation_image cond.png

What trains besides the adapters (``--controlnet_trainable``): a ControlNet made from the UNet
starts with zero output convolutions, so its new layers (conditioning embedding and zero
convolutions) train in full ("new_layers", the default with --adapt controlnet); "full" trains
the whole ControlNet (the default when it carries no adapter); "none" only the adapters.

Output: the adapters as a diffadapt pipeline artifact (``diffadapt.load_adapter(pipe,
output_dir)`` on a ControlNet pipeline), ``controlnet_model/`` (ControlNetModel.from_pretrained
folder) when the ControlNet's own weights are new or trained, README.md, validation grids.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import diffusers
import torch
from diffusers import ControlNetModel, DDPMScheduler
from diffusers.training_utils import cast_training_params, free_memory
from PIL import Image

import diffadapt as da
from diffadapt import training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import atomic_io  # noqa: E402
import common  # noqa: E402
from control_data import conditioning_mask, render_control_data  # noqa: E402,F401 - the tests use them from here
import sd_parts  # noqa: E402
import training_loop  # noqa: E402
from common import UsageError  # noqa: E402

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "sdxl",
}
CONTROL_PIPELINE = {"sd": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}
TEXT_STACK = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
NEW_LAYERS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
CONTROLNET_FOLDER = "controlnet_model"


def parse_args(argv=None):
    parser = common.Parser(description=__doc__.split("\n\n")[0])
    common.add_model_args(parser)
    g = parser.add_argument_group("ControlNet")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="A ControlNetModel to start from (folder, hub id, or a ControlNet pipeline folder). "
                   "Default: the base pipeline's controlnet if it has one, else ControlNetModel.from_unet.")
    g.add_argument("--adapt", default="controlnet",
                   help="Where the adapters go: unet, controlnet or unet,controlnet (default controlnet).")
    g.add_argument("--controlnet_trainable", choices=["auto", "full", "new_layers", "none"], default="auto",
                   help="ControlNet weights trained besides adapters (auto: new_layers if the ControlNet "
                   "carries adapters, else full).")
    g.add_argument("--controlnet_lr", type=float, default=None,
                   help="lr of the ControlNet's own trained weights (default: --learning_rate, which the adapters use).")
    g = parser.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None, help="Dataset folder with metadata.jsonl (see the docstring).")
    g.add_argument("--image_column", default="image")
    g.add_argument("--conditioning_image_column", default="conditioning_image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Share of captions replaced by empty strings.")
    g.add_argument("--validation_prompt", nargs="+", default=None, help="Prompt(s) for validation images.")
    g.add_argument("--validation_image", nargs="+", default=None,
                   help="Conditioning image(s) for validation: one per prompt, or one for all, or one prompt for all.")
    common.add_training_args(parser, output_dir="controlnet-diffadapt")
    common.add_adapter_args(parser)
    args = parser.parse_args(argv)

    if args.pretrained_model_name_or_path is None or sd_parts.is_embedded(args.pretrained_model_name_or_path):
        args.method = args.method or EMBEDDED_METHOD  # the embedded model: its own defaults
        if args.learning_rate is None:
            args.learning_rate = common.get_method(args.method).embedded_learning_rate
    common.check_common_args(args)
    args.adapt = [a.strip() for a in args.adapt.split(",") if a.strip()]
    unknown = sorted(set(args.adapt) - {"unet", "controlnet"})
    if unknown or not args.adapt:
        raise UsageError(f"--adapt takes unet, controlnet or unet,controlnet; got {','.join(args.adapt) or 'nothing'}.")
    if args.controlnet_trainable == "auto":
        args.controlnet_trainable = "new_layers" if "controlnet" in args.adapt else "full"
    if args.controlnet_trainable == "full" and "controlnet" in args.adapt:
        raise UsageError("--controlnet_trainable full trains the whole ControlNet; an adapter on it would be "
                         "redundant. Use --adapt unet, or --controlnet_trainable new_layers / none.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise UsageError("--proportion_empty_prompts must be in [0, 1].")
    args.comparison = None  # (caption, conditioning image) rows of before_after.png: the embedded default only
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = common.embedded_model_path()
    if sd_parts.is_embedded(args.pretrained_model_name_or_path) and args.train_data_dir is None:
        use_embedded_defaults(args)
    args.records = read_metadata(args)
    if args.validation_prompt or args.validation_image:
        prompts, images = args.validation_prompt or [], args.validation_image or []
        if not prompts or not images:
            raise UsageError("Validation needs both --validation_prompt and --validation_image.")
        if len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
            raise UsageError("Give one --validation_image per --validation_prompt, or a single one of either.")
        for image in images:
            if not os.path.isfile(image):
                raise UsageError(f"--validation_image {image} does not exist.")
        n = max(len(prompts), len(images))
        args.validation_pairs = list(zip(prompts * n if len(prompts) == 1 else prompts,
                                         images * n if len(images) == 1 else images))
    return args


# The embedded default (no model, no data): what it trains unless told otherwise (FourierFT, as measured
# by benchmarks/quality.py --controlnet); about a minute on 2 CPU cores.
EMBEDDED_METHOD = "fourierft"
EMBEDDED_STEPS = 300
EMBEDDED_SCENES = 64  # training examples rendered into <output_dir>/control_data
EMBEDDED_HELD_OUT = 3  # before_after.png's rows: masks of scenes not in the training set
EMBEDDED_SIZE = 64  # the embedded model's resolution (UNet sample size 16 x VAE factor 4)
DATA_FOLDER = "control_data"


def use_embedded_defaults(args) -> None:
    """The embedded model with no --train_data_dir: render the shape-world dataset into
    <output_dir>/control_data (the data flags' columns), default --max_train_steps to EMBEDDED_STEPS
    and --seed to 0, and set the before/after grid's held-out rows."""
    if args.seed is None:  # reproducible: the same data, adapter and grid on every machine
        args.seed = 0
    if args.max_train_steps is None:
        args.max_train_steps = EMBEDDED_STEPS
    args.image_column, args.conditioning_image_column, args.caption_column = "image", "conditioning_image", "text"
    args.train_data_dir = str(Path(args.output_dir, DATA_FOLDER))
    size = args.resolution or EMBEDDED_SIZE
    held_out = render_control_data(args.train_data_dir, EMBEDDED_SCENES, EMBEDDED_HELD_OUT, args.seed, size)
    args.comparison = [(text, mask) for text, mask, _ in held_out]
    print(f"No --train_data_dir: training a {args.method} adapter ({','.join(args.adapt)}) on the embedded model for "
          f"{args.max_train_steps} steps on {EMBEDDED_SCENES} shape-world scenes (mask -> scene) rendered into "
          f"{args.train_data_dir}; before_after.png at the end", flush=True)


def read_metadata(args) -> list[dict]:
    """(image, conditioning image, caption) records of --train_data_dir, every file checked."""
    if args.train_data_dir is None:
        raise UsageError("--train_data_dir is required (a folder with metadata.jsonl, see --help).")
    root = Path(args.train_data_dir)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise UsageError(f"--train_data_dir {root}: no metadata.jsonl there (see the layout in --help).")
    records = []
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{meta}:{number} is not a JSON object.") from None
        keys = (args.image_column, args.conditioning_image_column, args.caption_column)
        missing = [k for k in keys if k not in row]
        if missing:
            raise UsageError(f"{meta}:{number} has no {', '.join(missing)} (columns: {', '.join(row)}).")
        record = {"image": root / row[keys[0]], "conditioning": root / row[keys[1]], "caption": str(row[keys[2]])}
        for key in ("image", "conditioning"):
            if not record[key].is_file():
                raise UsageError(f"{meta}:{number}: {record[key]} does not exist.")
        records.append(record)
    if not records:
        raise UsageError(f"{meta} lists no examples.")
    return records[: args.max_train_samples] if args.max_train_samples else records


class ControlDataset:
    """Target image in [-1, 1], conditioning image in [0, 1] (same crop and flip), caption."""

    def __init__(self, args, seed: int):
        self.args, self.seed, self.epoch = args, seed, 0
        self.records = args.records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        a, r = self.args, self.records[index]
        rng = sd_parts.item_rng(self.seed, self.epoch, index)
        (image, cond), original, crop = sd_parts.resize_crop_flip(
            [sd_parts.load_rgb(r["image"]), sd_parts.load_rgb(r["conditioning"])],
            a.resolution, a.center_crop, a.random_flip, rng,
        )
        caption = "" if rng.random() < a.proportion_empty_prompts else r["caption"]
        return {"pixels": sd_parts.to_tensor(image), "cond": sd_parts.to_tensor(cond, normalize=False),
                "prompt": caption, "original": original, "crop": crop}


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixels"] for e in examples]),
        "conditioning_pixel_values": torch.stack([e["cond"] for e in examples]),
        "prompts": [e["prompt"] for e in examples],
        "original_sizes": [e["original"] for e in examples],
        "crops_top_left": [e["crop"] for e in examples],
    }


def has_controlnet(model: str) -> bool:
    """Whether a local pipeline folder ships a controlnet component (hub ids: assume not)."""
    index = Path(model, "model_index.json")
    return index.is_file() and (json.loads(index.read_text()).get("controlnet") or [None])[0] is not None


# diffusers' ControlNet conditioning embedding: one stride-2 convolution between each pair of these widths
CONDITIONING_CHANNELS = (16, 32, 96, 256)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Widths of a conditioning embedding that downsamples the conditioning image by the VAE's
    factor (diffusers' default (16, 32, 96, 256) is 8x: three stride-2 steps)."""
    steps = int(vae_scale_factor).bit_length() - 1
    if vae_scale_factor < 1 or 2 ** steps != vae_scale_factor:
        raise UsageError(f"the pipeline's VAE scale factor is {vae_scale_factor}; a ControlNet needs a power of two.")
    widths = CONDITIONING_CHANNELS[:-1] + (CONDITIONING_CHANNELS[-1],) * max(0, steps - 3)
    return widths[:steps] + (CONDITIONING_CHANNELS[-1],)


def embedding_factor(controlnet) -> int:
    """How much ``controlnet``'s conditioning embedding downsamples its image."""
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


def load_controlnet(args, base_pipe):
    """(ControlNetModel, where it came from; None when made here from the UNet). A new ControlNet's
    conditioning embedding follows the pipeline's VAE scale factor (the image and the latents must
    meet at the same size); a given one that does not is refused, naming both factors."""
    source, factor = args.controlnet_model_name_or_path, base_pipe.vae_scale_factor
    if source is not None:
        sub = "controlnet" if Path(source, "model_index.json").is_file() else None
        try:
            controlnet = ControlNetModel.from_pretrained(source, subfolder=sub, revision=args.revision)
        except (OSError, ValueError) as err:
            raise UsageError(f"--controlnet_model_name_or_path {source}: {err}") from None
    elif getattr(base_pipe, "controlnet", None) is not None:
        controlnet, source = base_pipe.controlnet, f"{args.pretrained_model_name_or_path} (controlnet)"
    else:
        return ControlNetModel.from_unet(base_pipe.unet, conditioning_embedding_out_channels=conditioning_channels(factor)), None
    if embedding_factor(controlnet) != factor:
        raise UsageError(
            f"{source}: its conditioning embedding downsamples by {embedding_factor(controlnet)} "
            f"(conditioning_embedding_out_channels {list(controlnet.config.conditioning_embedding_out_channels)}), "
            f"the pipeline's VAE by {factor}; give a ControlNet made for this VAE, or none (one is made from the UNet)."
        )
    return controlnet, source


def control_pipeline(family, base_pipe, controlnet):
    return getattr(diffusers, CONTROL_PIPELINE[family]).from_pipe(base_pipe, controlnet=controlnet)


def save_controlnet_weights(controlnet, folder, full_state=None) -> None:
    """The ControlNet's own weights (adapters removed with diffadapt.unload, in place: call this
    last), as a ControlNetModel.from_pretrained folder in fp32. ``full_state``: its gathered state
    dict under --fsdp (:func:`gather_sharded`), written through a plain ControlNetModel."""
    if da.has_adapters(controlnet):
        da.unload(controlnet)
    if full_state is not None:
        plain = ControlNetModel.from_config(controlnet.config)
        plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in full_state.items() if ".adapters." not in k})
        controlnet = plain
    controlnet.to(torch.float32).save_pretrained(folder, safe_serialization=True)


def gather_sharded(model) -> dict:
    """--fsdp, a collective on every process: the full state dict of the FSDP-sharded ``model``
    (adapter hosts included) on the CPU of the main process (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # --fsdp only

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def validate(args, accelerator, pipe, tag: str, step: int) -> str:
    """One grid row per (prompt, conditioning image): the conditioning image, then the samples."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed_value)
    tiles = []
    for prompt, image_path in args.validation_pairs:
        cond = sd_parts.load_rgb(image_path).resize((args.resolution, args.resolution), Image.BILINEAR)
        with torch.no_grad(), training.autocast(accelerator):
            samples = [pipe(prompt=prompt, image=cond, num_inference_steps=args.num_inference_steps,
                            height=args.resolution, width=args.resolution, generator=generator).images[0]
                       for _ in range(args.num_validation_images)]
        tiles += [cond] + samples
    sd_parts.log_images(accelerator, tag, tiles, step)
    return sd_parts.save_grid(tiles, Path(args.output_dir, "validation", f"{tag}.png"), rows=len(args.validation_pairs))


GRID_SIZE = 192  # before_after.png's cells (the column labels fit)


def before_after(args, accelerator, pipe, start) -> str:
    """before_after.png: one row per held-out conditioning image (``args.comparison``), columns
    the image; ``start``, the pipeline with the ControlNet as training started (new from the UNet:
    its zero output convolutions add nothing, so these are the base model's images; a given one:
    as given) and no adapter; ``pipe``, the adapted pipeline, at strength 0 (the ControlNet's own
    weights as trained or given) and at strength 1; the same seed in every column; returns its path.
    ``start`` shares ``pipe``'s UNet and text encoders: adapters on any of its models are disabled
    for its column."""
    pipe.set_progress_bar_config(disable=True)
    start.set_progress_bar_config(disable=True)
    new = args.controlnet_model_name_or_path is None and not has_controlnet(args.pretrained_model_name_or_path)
    weights = "given" if args.controlnet_trainable == "none" else "trained"
    columns = ["conditioning image", "base (untrained ControlNet)" if new else "given ControlNet, no adapter",
               f"strength 0 ({weights} ControlNet)", "adapted (strength 1)"]
    adapted = [m for m in start.components.values() if isinstance(m, torch.nn.Module) and da.has_adapters(m)]

    def sample(p, text, cond):
        generator = torch.Generator(accelerator.device).manual_seed(args.seed_value)
        with torch.no_grad(), training.autocast(accelerator):
            return p(prompt=text, image=cond, num_inference_steps=args.num_inference_steps,
                     height=args.resolution, width=args.resolution, generator=generator).images

    rows = []
    try:
        for text, mask in args.comparison:
            cond = mask.resize((args.resolution, args.resolution), Image.BILINEAR)
            for module in adapted:
                da.disable_adapters(module)
            try:
                images = [cond] + sample(start, text, cond)
            finally:
                for module in adapted:
                    da.enable_adapters(module)
            for strength in (0.0, 1.0):
                da.set_adapters(pipe, common.ADAPTER_NAME, strength)
                images += sample(pipe, text, cond)
            rows.append(("\n".join(textwrap.wrap(text, 46) + [f"seed {args.seed_value}"]), images))
    finally:
        da.set_adapters(pipe, common.ADAPTER_NAME, 1.0)
    path = Path(args.output_dir, "before_after.png")
    sd_parts.labelled_grid(rows, path, size=GRID_SIZE, columns=columns)
    return str(path)


def print_done(args, grids, save_weights: bool) -> None:
    """The line a user needs at the end: where the output went."""
    grid = next((g for g in grids if Path(g).name == "before_after.png"), None)
    shown = ", before_after.png (conditioning image / base / strength 0 / strength 1)" if grid else ""
    weights = f", {CONTROLNET_FOLDER}/" if save_weights else ""
    print(f"Saved the adapter{weights}, its model card README.md{shown} to {args.output_dir}", flush=True)


@common.guarded
def main(argv=None):
    args = parse_args(argv)
    family, _ = common.pipeline_family(args, FAMILIES, "train_controlnet.py", "SD 1.x/2.x and SDXL UNets")
    config = common.adapter_config(args, common.parse_targets(args.target_modules))  # field validation
    training_loop.find_resume(args)  # a missing or damaged checkpoint: refused before anything loads
    if args.controlnet_trainable == "none" and args.controlnet_model_name_or_path is None \
            and not has_controlnet(args.pretrained_model_name_or_path):
        raise UsageError("A ControlNet made from the UNet starts with zero output convolutions and would stay a "
                         "no-op with --controlnet_trainable none; train its new layers (new_layers) or pass "
                         "--controlnet_model_name_or_path.")

    accelerator = training_loop.make_accelerator(args)
    # -- models, then adapters (refusals come here, before any data is read)
    base = training_loop.start_run(args, accelerator, family)
    controlnet, controlnet_source = load_controlnet(args, base)
    pipe = control_pipeline(family, base, controlnet)
    unet = pipe.unet
    # the frozen UNet only (after ControlNetModel.from_unet has copied its float weights); the ControlNet stays float
    training_loop.quantize_base(args, accelerator, pipe, ["unet"], TEXT_STACK[family])
    if args.resolution is None:
        args.resolution = int(unet.config.sample_size) * pipe.vae_scale_factor
    preset = args.target_preset
    unet.requires_grad_(False)
    controlnet.requires_grad_(False)
    for role, model in (("unet", unet), ("controlnet", controlnet)):
        if role in args.adapt:
            common.inject(model, config, preset, role)
    if args.controlnet_trainable == "full":
        controlnet.requires_grad_(True)
    elif args.controlnet_trainable == "new_layers":
        for name in NEW_LAYERS:
            getattr(controlnet, name).requires_grad_(True)
    models = {}
    for role, model in (("unet", unet), ("controlnet", controlnet)):
        if any(p.requires_grad for p in model.parameters()):
            models[role] = model
    training_loop.check_resume(args, models)  # another run's checkpoint: refused before any work
    trainable = {role: da.count_parameters(m)[0] for role, m in models.items()}
    accelerator.print(f"{args.method} adapters on {','.join(args.adapt)}; trainable parameters: {trainable}")

    dtype = training.weight_dtype(accelerator)
    pipe.vae.to(accelerator.device).requires_grad_(False)
    encoders = [getattr(pipe, n) for n in TEXT_STACK[family]]
    tokenizers = [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in TEXT_STACK[family]]
    for module in encoders + [unet, controlnet]:
        training_loop.to_device(module, accelerator.device, dtype)
    for module in encoders + [m for m in (unet, controlnet) if m not in models.values()]:
        module.requires_grad_(False)
    cast_training_params(list(models.values()), dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()

    # -- data, optimizer, accelerate
    dataset = ControlDataset(args, args.seed_value)
    sampler = training.EpochSampler(len(dataset), args.seed_value)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=args.dataloader_num_workers)
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        args.controlnet_lr = args.controlnet_lr and args.controlnet_lr * factor
    adapter_ids = {id(p) for m in models.values() if da.has_adapters(m)
                   for p in da.adapter_parameters(m, common.ADAPTER_NAME).values()}
    trained = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) in adapter_ids], "lr": args.learning_rate},
              {"params": [p for p in trained if id(p) not in adapter_ids], "lr": args.controlnet_lr or args.learning_rate}]
    groups = [g for g in groups if g["params"]]
    wrapped, optimizer, dataloader, lr_scheduler, steps_per_epoch = training_loop.prepare(
        accelerator, args, models, groups, dataloader)
    if accelerator.is_main_process:
        accelerator.init_trackers("controlnet-diffadapt", config={k: str(v) for k, v in vars(args).items()
                                                                  if k not in ("records", "comparison")})
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    run_unet, run_controlnet = wrapped.get("unet", unet), wrapped.get("controlnet", controlnet)

    def loss_fn(batch, generator):
        pixels = batch["pixel_values"].to(accelerator.device)
        latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample(generator)
        latents = (latents * pipe.vae.config.scaling_factor).to(dtype)
        noisy, noise, t = sd_parts.unet_noise(noise_scheduler, latents, generator, args.noise_offset)
        with torch.no_grad():
            cond = sd_parts.encode_clip_prompts(family, encoders, tokenizers, batch["prompts"], accelerator.device)
        hidden = cond["encoder_hidden_states"].to(dtype)
        extra = sd_parts.unet_added_cond(family, cond, batch, args.resolution, dtype)
        down, mid = run_controlnet(noisy, t, encoder_hidden_states=hidden, return_dict=False,
                                   controlnet_cond=batch["conditioning_pixel_values"].to(accelerator.device, dtype),
                                   **extra)
        pred = run_unet(noisy, t, hidden, return_dict=False, down_block_additional_residuals=[d.to(dtype) for d in down],
                        mid_block_additional_residual=mid.to(dtype), **extra)[0]
        target = sd_parts.unet_target(noise_scheduler, latents, noise, t)
        return sd_parts.unet_loss(pred, target, t, noise_scheduler, args.snr_gamma)

    grids = []
    validating = bool(getattr(args, "validation_pairs", None))

    def validate_fn(step):
        grids.append(validate(args, accelerator, pipe, f"step_{step:06d}", step))

    global_step = training_loop.train(
        accelerator, args, models=models, wrapped=wrapped, optimizer=optimizer, lr_scheduler=lr_scheduler,
        dataloader=dataloader, steps_per_epoch=steps_per_epoch, epoch_users=[sampler, dataset], loss_fn=loss_fn,
        validate_fn=validate_fn if validating else None,
    )

    # -- artifacts, once, on the main process
    if args.debug_rank_digest:  # before saving: saving unloads the ControlNet's adapters
        training_loop.write_rank_digest(accelerator, args, models, saved=accelerator.is_main_process)
    save_weights = controlnet_source is None or args.controlnet_trainable != "none"
    full_state = None  # --fsdp: the sharded ControlNet gathered first (a collective), then saved by the main process
    if save_weights and training_loop.fsdp_active(accelerator, args) and "controlnet" in models:
        full_state = gather_sharded(controlnet)
    if accelerator.is_main_process:
        metadata = {"base_model": args.pretrained_model_name_or_path, "method": args.method, "family": family,
                    "adapt": ",".join(args.adapt), "controlnet_trainable": args.controlnet_trainable,
                    "controlnet": CONTROLNET_FOLDER if save_weights else controlnet_source,
                    "resolution": args.resolution, "steps": global_step}

        def write(folder):  # into a temporary folder first: a kill leaves no half-written files
            da.save_adapter(pipe, folder, common.ADAPTER_NAME, metadata=metadata)
            if save_weights:
                save_controlnet_weights(controlnet, Path(folder, CONTROLNET_FOLDER), full_state)

        atomic_io.publish_artifact(args.output_dir, write)
        if validating or args.comparison:  # from the saved files, as users will load them
            free_memory()
            fresh_base = training_loop.load_pipeline(args, family)
            # before_after.png's base column: the ControlNet as training started (made before the UNet is quantized)
            start_cn = load_controlnet(args, fresh_base)[0] if args.comparison else None
            if save_weights:
                fresh_cn = ControlNetModel.from_pretrained(Path(args.output_dir, CONTROLNET_FOLDER))
            else:
                fresh_cn, _ = load_controlnet(args, fresh_base)
            final = control_pipeline(family, fresh_base, fresh_cn)
            training_loop.quantize_base(args, accelerator, final, ["unet"], TEXT_STACK[family], pin=False)
            da.load_adapter(final, args.output_dir, common.ADAPTER_NAME)
            final.to(accelerator.device)
            if validating:
                grids.append(validate(args, accelerator, final, "final", global_step))
            if args.comparison:
                start = control_pipeline(family, final, start_cn).to(accelerator.device)
                grids.append(before_after(args, accelerator, final, start))
        if save_weights:
            cn_line = f"ControlNetModel.from_pretrained({str(Path(args.output_dir, CONTROLNET_FOLDER))!r})"
        else:
            src = args.controlnet_model_name_or_path or args.pretrained_model_name_or_path
            sub = ', subfolder="controlnet"' if Path(src, "model_index.json").is_file() else ""
            cn_line = f"ControlNetModel.from_pretrained({src!r}{sub})"
        usage = f"""
import diffadapt as da
from diffusers import ControlNetModel, {CONTROL_PIPELINE[family]}

controlnet = {cn_line}
pipe = {CONTROL_PIPELINE[family]}.from_pretrained({args.pretrained_model_name_or_path!r}, controlnet=controlnet)
da.load_adapter(pipe, {str(args.output_dir)!r})
image = pipe("a caption", image=conditioning_image).images[0]
"""
        sd_parts.write_model_card(
            args, title=f"ControlNet {args.method} adapter", tags=["controlnet", "text-to-image", family],
            base_model=args.pretrained_model_name_or_path, usage=usage,
            config=sd_parts.card_config(config, preset), trainable=trainable,
            extra=f"Adapters on: {', '.join(args.adapt)}; ControlNet weights trained: {args.controlnet_trainable}"
            f"; ControlNet: {metadata['controlnet'] or 'new, from the UNet'}.\n",
            images=[os.path.relpath(g, args.output_dir) for g in grids],
        )
        print_done(args, grids, save_weights)
    accelerator.end_training()


if __name__ == "__main__":
    main()
