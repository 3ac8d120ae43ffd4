"""The training loop both scripts run, with its accelerate glue: the Accelerator, dtypes, the
optimizer and schedule, checkpoints (only trainable tensors), resume (``latest``),
deterministic data order and noise per step, rank digests (tests), train_log.jsonl; and
loading the base pipeline at the start of a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import UsageError, tensorboard_available

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (fast --help)
    import torch


def make_accelerator(args, find_unused_parameters: bool = False):
    import logging

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)

    report_to = args.report_to
    if report_to is None:
        report_to = "tensorboard" if tensorboard_available() else None
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
