"""What train_dreambooth.py and train_controlnet.py share, and nothing else.

* refusing bad input: ``UsageError``, ``fail`` (one line on stderr, exit code 2, no traceback)
  and ``guarded`` (turns UsageError / AdapterConfigError / CheckpointError into that line);
* argument groups: the diffusers training flags both scripts use, and the adapter flags
  (``--method``, each method's hyper-parameters, ``--adapter_config``, targets);
* adapter configs from those flags, and injection (presets, ControlNetModel workaround);
* model folders: reading ``model_index.json`` to tell the family;
* accelerate glue: the Accelerator, the optimizer, checkpoints (only trainable tensors),
  resume (``latest``), deterministic data order and noise per step, rank digests (tests);
* SD/SDXL pieces both scripts need: prompt encoding, SDXL time ids, the epsilon/v loss;
* images (no torchvision): resize / crop / flip / to tensor; the model card.

Heavy libraries (torch, diffusers, transformers, diffadapt) are imported inside functions so
that argument errors come back at once, before they load.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

ADAPTER_NAME = "default"

# ----------------------------------------------------------------------------------------------
# refusing bad input with one line
# ----------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Arguments that cannot work; reported as one line, exit code 2."""


def fail(message: str, code: int = 2) -> None:
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


def _refusals() -> tuple[type, ...]:
    found = [UsageError]
    if "diffadapt" in sys.modules:
        from diffadapt import AdapterConfigError, CheckpointError

        found += [AdapterConfigError, CheckpointError]
    return tuple(found)


def guarded(main):
    """Run ``main(argv)``; known refusals become one stderr line and exit code 2."""

    def run(argv=None):
        try:
            return main(argv)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a refusal
            if isinstance(err, _refusals()):
                fail(err)
            raise

    return run


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line too (instead of usage + message)."""

    def error(self, message):
        fail(f"{self.prog}: {message}")


# ----------------------------------------------------------------------------------------------
# argument groups
# ----------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Hub id or local diffusers pipeline folder (model_index.json tells the family). "
        "Default: the small model embedded in diffadapt (diffadapt.defaults.default_model_path()).",
    )
    g.add_argument("--revision", default=None, help="Hub revision of the base model.")
    g.add_argument("--variant", default=None, help="Weights variant of the base model, e.g. fp16.")


def add_training_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The flags of diffusers' training scripts both scripts share (same names and meanings)."""
    g = parser.add_argument_group("training (diffusers' flag names)")
    g.add_argument("--output_dir", default=output_dir)
    g.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training resolution; default: the denoiser's sample_size x VAE scale factor.")
    g.add_argument("--center_crop", action="store_true", help="Center crop instead of random crop.")
    g.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="Default depends on --method (see DEFAULT_LR in train_scripts/common.py).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the lr by gradient accumulation steps x batch size x processes.")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--use_8bit_adam", action="store_true", help="AdamW8bit from bitsandbytes.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (UNet models).")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                   help="Override the scheduler's prediction type (UNet models).")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (UNet models).")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=100, help="Validate every X steps.")
    g.add_argument("--num_inference_steps", type=int, default=25,
                   help="Denoising steps for validation images (and generated class images).")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint every X updates (accelerator.save_state).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    g.add_argument("--report_to", default=None,
                   help='"tensorboard" (default when installed), "wandb", "all" or "none".')
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--debug_rank_digest", action="store_true",
                   help="Write <output_dir>/debug/rank<i>.json with a hash of the trained tensors on each process.")


# flag -> (method, config field, type, help). None means "not given": the config default applies.
METHOD_FLAGS = {
    "n_frequency": ("fourierft", "n_frequency", int, "FourierFT: spectral coefficients per layer (1000)."),
    "fourierft_scaling": ("fourierft", "scaling", float, "FourierFT: scaling alpha (150)."),
    "random_loc_seed": ("fourierft", "random_loc_seed", int, "FourierFT: seed of the frequency positions (777)."),
    "boft_block_size": ("boft", "boft_block_size", int, "BOFT: block size b (4)."),
    "boft_block_num": ("boft", "boft_block_num", int, "BOFT: number of blocks (0: use the block size)."),
    "boft_n_butterfly_factor": ("boft", "boft_n_butterfly_factor", int, "BOFT: butterfly factors m (1)."),
    "boft_dropout": ("boft", "boft_dropout", float, "BOFT: multiplicative dropout (0)."),
    "oft_block_size": ("oft", "oft_block_size", int, "OFT: block size (32)."),
    "oft_r": ("oft", "r", int, "OFT: number of blocks (0: use the block size)."),
    "oft_coft": ("oft", "coft", bool, "OFT: constrained OFT."),
    "oft_eps": ("oft", "eps", float, "OFT: COFT radius."),
    "oft_block_share": ("oft", "block_share", bool, "OFT: share one block."),
    "use_cayley_neumann": ("oft", "use_cayley_neumann", bool, "OFT: Cayley-Neumann series instead of exact."),
    "hra_r": ("hra", "r", int, "HRA: Householder reflections r (8; even for an identity init)."),
    "hra_apply_GS": ("hra", "apply_GS", bool, "HRA: Gram-Schmidt orthogonalisation."),
    "sparse_rate": ("frod", "sparse_rate", float, "FRoD: share of off-diagonal couplings (0.01)."),
    "regularization_alpha": ("frod", "regularization_alpha", float, "FRoD: basis regularisation (1e-3)."),
    "projection_prng_key": ("frod", "projection_prng_key", int, "FRoD: seed of the sparse pattern (0)."),
    "frod_dropout": ("frod", "frod_dropout", float, "FRoD: dropout (0)."),
}
METHODS = ("fourierft", "boft", "oft", "hra", "frod")
# Starting points, not tuned results: FourierFT trains raw spectral coefficients (large steps),
# the rotation methods train small skew / Householder parameters, FRoD a spectrum.
DEFAULT_LR = {"fourierft": 1e-2, "boft": 1e-4, "oft": 1e-4, "hra": 1e-4, "frod": 1e-3}
# Config fields these scripts set differently from the method's (PEFT's) default; --adapter_config
# and the flags override them. FourierFT: start from a zero spectrum, i.e. the base model, as every
# other method does — PEFT's default random spectrum (times scaling 150) changes the model before
# the first step, on a small model beyond recognition.
SCRIPT_DEFAULTS = {"fourierft": {"init_weights": True}}


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adapter (diffadapt)")
    g.add_argument("--method", default=None, choices=METHODS,
                   help="Adapter method (required, except that train_dreambooth.py on the embedded model defaults to one).")
    for flag, (method, _, kind, help_text) in METHOD_FLAGS.items():
        if kind is bool:
            g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(f"--{flag}", type=kind, default=None, help=help_text)
    g.add_argument("--adapter_config", default=None,
                   help="JSON object (or a path to a .json file) with any other config fields, e.g. "
                   '\'{"init_weights": true, "overrides": {"attn2.to_k": {"boft_block_size": 8}}}\'. '
                   "Explicit flags win over it.")
    g.add_argument("--target_preset", choices=["attention", "attention+ff"], default=None,
                   help="Layers to adapt per architecture (default attention); see diffadapt.PRESETS.")
    g.add_argument("--target_modules", default=None,
                   help="Instead of a preset: comma-separated module-name suffixes (to_q,to_v), "
                   "one regex (full match), or all-linear.")


def adapter_fields(args) -> dict:
    """Config fields: SCRIPT_DEFAULTS, then --adapter_config, then the method flags; refuses
    other methods' flags."""
    fields = dict(SCRIPT_DEFAULTS.get(args.method, {}))
    if args.adapter_config:
        text = args.adapter_config
        if not text.lstrip().startswith("{") and os.path.isfile(text):
            text = Path(text).read_text()
        try:
            given = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--adapter_config is not valid JSON ({err.msg} at char {err.pos}).") from None
        if not isinstance(given, dict):
            raise UsageError("--adapter_config must be a JSON object of config fields.")
        given.pop("method", None)
        fields.update(given)
    for flag, (method, field_name, _, _) in METHOD_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if method != args.method:
            raise UsageError(f"--{flag} is a {method} hyper-parameter, but --method is {args.method}.")
        fields[field_name] = value
    return fields


def parse_targets(text):
    """``--target_modules`` text -> PEFT's target_modules (list of suffixes or one regex)."""
    if text is None:
        return None
    if text == "all-linear" or re.search(r"[\\^$*+?()\[\]{}|]", text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def adapter_config(args, target_modules=None):
    """The method's config built (and field-validated) from the flags."""
    from diffadapt import AdapterConfigError, get_method

    fields = adapter_fields(args)
    if target_modules is not None:
        fields["target_modules"] = target_modules
    try:
        return get_method(args.method).config_class.from_dict(fields)
    except TypeError as err:  # a field of the wrong kind in --adapter_config
        raise AdapterConfigError(f"{args.method} config from the flags / --adapter_config: {err}") from None


# architectures without their own preset whose module names follow another's
PRESET_TWINS = {"ControlNetModel": "UNet2DConditionModel", "SD3ControlNetModel": "SD3Transformer2DModel"}


def inject(model, config, preset: str | None, role: str) -> list[str]:
    """``diffadapt.add_adapter`` with the preset resolved; names the component in errors.

    Workaround: diffadapt has no presets for ControlNet models; their attention layers carry
    the UNet's / SD3 transformer's module names, so those presets are used for them."""
    import diffadapt as da
    from diffadapt import AdapterConfigError

    twin = PRESET_TWINS.get(type(model).__name__)
    if config.target_modules is None and twin is not None:
        config = type(config).from_dict({**config.to_dict(), "target_modules": da.PRESETS[twin][preset or "attention"]})
        preset = None
    try:
        return da.add_adapter(model, config, ADAPTER_NAME, preset=None if config.target_modules else preset)
    except AdapterConfigError as err:
        raise AdapterConfigError(f"{role} ({type(model).__name__}): {err}") from None


def check_common_args(args) -> None:
    """Cheap checks before anything heavy is imported or loaded (the config's own validation
    comes next, in main, with diffadapt imported; layer checks when the model is loaded)."""
    if args.method is None:
        raise UsageError(f"--method is required: one of {', '.join(METHODS)}.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes); it is not installed.")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError("--checkpoints_total_limit must be >= 1.")
    if args.target_preset and args.target_modules:
        raise UsageError("Give either --target_preset or --target_modules, not both.")
    if args.report_to == "tensorboard" and not _tensorboard_available():
        raise UsageError("--report_to tensorboard needs tensorboard (pip install tensorboard); it is not installed.")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR[args.method]
    adapter_fields(args)  # flags of another method, bad --adapter_config JSON


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


# ----------------------------------------------------------------------------------------------
# model folders
# ----------------------------------------------------------------------------------------------


def pipeline_class_name(model: str, revision=None) -> str:
    """``_class_name`` of a pipeline folder or hub repo's model_index.json."""
    if os.path.isdir(model):
        index = Path(model, "model_index.json")
        if not index.is_file():
            raise UsageError(f"{model} has no model_index.json: not a diffusers pipeline folder.")
        return json.loads(index.read_text()).get("_class_name", "?")
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--pretrained_model_name_or_path {model}: no such folder.")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model, revision=revision).get("_class_name", "?")
    except Exception as err:  # noqa: BLE001 - hub / network errors of any kind
        raise UsageError(f"cannot read model_index.json of {model!r}: {type(err).__name__}: {err}") from None


def embedded_model_path() -> str:
    from diffadapt.defaults import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as err:
        raise UsageError(f"no --pretrained_model_name_or_path given and {err}") from None


# ----------------------------------------------------------------------------------------------
# accelerate glue
# ----------------------------------------------------------------------------------------------


def make_accelerator(args, find_unused_parameters: bool = False):
    import logging

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)

    report_to = args.report_to
    if report_to is None:
        report_to = "tensorboard" if _tensorboard_available() else None
    if report_to == "none":
        report_to = None
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir)))
    # several processes (torchrun / accelerate launch) on a machine without an accelerator:
    # accelerate only sets up gloo data parallelism with cpu=True; otherwise each process would
    # silently train alone as rank 0 of 1
    accel = getattr(torch, "accelerator", None)
    has_accelerator = accel.is_available() if accel is not None else torch.cuda.is_available()
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def autocast(accelerator):
    """Autocast for inference with mixed-precision weights (fp32 VAE and adapters), else nothing."""
    import contextlib

    import torch

    if accelerator.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(accelerator.device.type)


def to_device(model, device, dtype) -> None:
    """Move a model, casting it only for mixed precision (the trained tensors are cast back to
    fp32 with diffusers.training_utils.cast_training_params afterwards)."""
    import torch

    model.to(device) if dtype == torch.float32 else model.to(device, dtype=dtype)


def shared_seed(args, accelerator) -> int:
    """--seed, or one random seed agreed by all processes (data order must match across ranks)."""
    if args.seed is not None:
        return args.seed
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]


def weight_dtype(accelerator) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def step_generator(accelerator, seed: int, global_step: int, micro: int) -> torch.Generator:
    """Noise, timesteps and VAE samples of one micro-batch: a function of (seed, step, micro-batch,
    rank) only, so a resumed run draws exactly what an uninterrupted one draws."""
    import torch

    index = (global_step * 1024 + micro) * accelerator.num_processes + accelerator.process_index
    return torch.Generator(accelerator.device).manual_seed((seed * 1_000_003 + index) % (2**63))


class EpochSampler:
    """A shuffled order that depends on (seed, epoch) only. ``use_epoch`` is called by the
    training loop (deliberately not ``set_epoch``, which accelerate would call with its own count)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_optimizer(args, param_groups):
    import torch

    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        param_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(args, optimizer, accelerator):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` (adapter parameters, and e.g. a trained ControlNet)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def register_checkpointing(accelerator, models: dict) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only what trains: one safetensors
    file per model role (``<role>.trainable.safetensors``) instead of the whole frozen model.
    Optimizer, lr scheduler, step and RNG states are saved by accelerate as usual."""
    import torch
    from safetensors.torch import load_file, save_file

    def role_of(model):
        inner = accelerator.unwrap_model(model)
        return next((r for r, m in models.items() if m is inner), None)

    def save_hook(saved_models, weights, output_dir):
        for i in reversed(range(len(saved_models))):
            role = role_of(saved_models[i])
            if role is None:
                continue
            if accelerator.is_main_process:
                save_file(trainable_state(models[role]), os.path.join(output_dir, f"{role}.trainable.safetensors"))
            if i < len(weights):
                weights.pop(i)

    def load_hook(loaded_models, input_dir):
        for i in reversed(range(len(loaded_models))):
            role = role_of(loaded_models[i])
            if role is None:
                continue
            path = os.path.join(input_dir, f"{role}.trainable.safetensors")
            if not os.path.isfile(path):
                raise UsageError(f"{input_dir} has no {role}.trainable.safetensors: not a checkpoint of this training.")
            tensors = load_file(path)
            params = {n: p for n, p in models[role].named_parameters() if p.requires_grad}
            if set(tensors) != set(params):
                raise UsageError(
                    f"{path} holds other tensors than this run trains ({len(tensors)} vs {len(params)}); "
                    "resume with the same method, hyper-parameters and targets."
                )
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tensors[n])
            loaded_models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _checkpoints(output_dir) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def save_checkpoint(accelerator, args, global_step: int) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>`` (all processes call it:
    accelerate writes models/optimizer on the main process and each process's RNG state),
    keeping at most ``--checkpoints_total_limit`` checkpoints."""
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        existing = _checkpoints(args.output_dir)
        for name in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()
    path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    return path


def resolve_resume(args) -> str | None:
    """The checkpoint folder --resume_from_checkpoint names (None: start fresh)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(args.output_dir)
        return os.path.join(args.output_dir, found[-1]) if found else None
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(path))
    if not os.path.isdir(path) or not re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.normpath(path))):
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint-<step> folder there.")
    return path


def resume(accelerator, args, steps_per_epoch: int) -> tuple[int, int, int]:
    """Load the checkpoint if asked; returns (global_step, first_epoch, batches to skip)."""
    path = resolve_resume(args)
    if path is None:
        if args.resume_from_checkpoint:
            accelerator.print(f"No checkpoint in {args.output_dir}; starting a new training run.")
        return 0, 0, 0
    accelerator.print(f"Resuming from {path}")
    accelerator.load_state(path)
    global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
    first_epoch = global_step // steps_per_epoch
    skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    return global_step, first_epoch, skip


def training_plan(args, batches_per_epoch: int) -> int:
    """Fill max_train_steps / num_train_epochs like the diffusers scripts; returns updates per epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    return steps_per_epoch


def write_rank_digest(accelerator, args, models: dict, saved: bool) -> None:
    """Debug/tests: each process writes a hash of its trained tensors (must agree across ranks)."""
    import torch

    digest, total, count = hashlib.sha256(), 0.0, 0
    for role in sorted(models):
        for name, tensor in sorted(trainable_state(models[role]).items()):
            t = tensor.float()
            digest.update(f"{role}.{name}".encode())
            digest.update(t.numpy().tobytes())
            total += float(t.double().sum())
            count += t.numel()
    out = Path(args.output_dir, "debug")
    out.mkdir(parents=True, exist_ok=True)
    info = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
            "sha256": digest.hexdigest(), "sum": total, "numel": count, "saved_artifact": saved}
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(info, indent=2))


def prepare(accelerator, args, models: dict, groups: list, dataloader):
    """optimizer + lr schedule + ``accelerator.prepare``; returns (wrapped models by role,
    optimizer, dataloader, lr scheduler, updates per epoch). ``groups``: optimizer param groups."""
    optimizer = make_optimizer(args, groups)
    training_plan(args, math.ceil(len(dataloader) / accelerator.num_processes))  # before sharding
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator)
    roles = list(models)
    prepared = accelerator.prepare(*[models[r] for r in roles], optimizer, dataloader, lr_scheduler)
    wrapped = dict(zip(roles, prepared[: len(roles)]))
    optimizer, dataloader, lr_scheduler = prepared[len(roles):]
    steps_per_epoch = training_plan(args, len(dataloader))  # after sharding
    register_checkpointing(accelerator, models)
    return wrapped, optimizer, dataloader, lr_scheduler, steps_per_epoch


def train(accelerator, args, *, models, wrapped, optimizer, lr_scheduler, dataloader, steps_per_epoch,
          epoch_users, loss_fn, validate_fn=None) -> int:
    """The loop both scripts run (diffusers' structure): resume, epochs, gradient accumulation,
    clipping, checkpoints every --checkpointing_steps, validation every --validation_steps (main
    process), tqdm with loss and lr, tracker + train_log.jsonl. Returns the final global step.

    ``loss_fn(batch, generator)`` returns the loss of one micro-batch; ``epoch_users`` get
    ``use_epoch``/``epoch`` set (sampler, dataset) so data order and augmentation follow the epoch."""
    from tqdm.auto import tqdm

    global_step, first_epoch, skip = resume(accelerator, args, steps_per_epoch)
    log = JsonlLog(accelerator, args.output_dir, global_step)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    micro, start = 0, time.perf_counter()
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        for user in epoch_users:
            user.use_epoch(epoch) if hasattr(user, "use_epoch") else setattr(user, "epoch", epoch)
        for m in wrapped.values():
            m.train()
        batches = accelerator.skip_first_batches(dataloader, skip) if epoch == first_epoch and skip else dataloader
        for batch in batches:
            with accelerator.accumulate(*wrapped.values()):
                loss = loss_fn(batch, step_generator(accelerator, args.seed_value, global_step, micro))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            micro += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            if accelerator.sync_gradients:
                micro = 0
                global_step += 1
                progress.update(1)
                log.write(step=global_step, epoch=epoch, **logs, seconds=round(time.perf_counter() - start, 3))
                if global_step % args.checkpointing_steps == 0:
                    accelerator.print(f"Saved state to {save_checkpoint(accelerator, args, global_step)}")
                if validate_fn and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    for m in models.values():
                        m.eval()
                    validate_fn(global_step)
                    for m in models.values():
                        m.train()
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    return global_step


class JsonlLog:
    """train_log.jsonl in the output folder (main process): step, epoch, loss, lr and the seconds
    since the loop (re)started - readable without trackers."""

    def __init__(self, accelerator, output_dir, resume_step: int):
        self.path = Path(output_dir, "train_log.jsonl") if accelerator.is_main_process else None
        if self.path is not None and resume_step == 0 and self.path.exists():
            self.path.unlink()

    def write(self, **values) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(values) + "\n")


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
    make_image_grid(images, rows=rows, cols=math.ceil(len(images) / rows)).save(path)
    return str(path)


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
        grid.save(path)
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
    Path(args.output_dir, "README.md").write_text("\n".join(front + lines))


def start_run(args, accelerator, family: str):
    """Per-process logging, the shared seed, the output folder; then the base pipeline."""
    import diffusers
    import transformers
    from accelerate.utils import set_seed

    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    args.seed_value = shared_seed(args, accelerator)
    set_seed(args.seed_value)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return load_pipeline(args, family)


def load_pipeline(args, family: str):
    """The base pipeline from --pretrained_model_name_or_path (no safety checker for SD 1.x/2.x)."""
    from diffusers import DiffusionPipeline

    load = dict(revision=args.revision, variant=args.variant)
    if family == "sd":
        load.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **load)
