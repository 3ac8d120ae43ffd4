"""Training helpers that do not depend on the model or the script (diffusers' ``training_utils``
is the model): reproducible seeds and data order, the optimizer and lr schedule, gradient
averaging for replicated parameters, and resumable checkpoints whose trained parts are adapters.

Checkpoints (``checkpoint-<step>/``, written by ``accelerator.save_state`` with the hooks of
:func:`register_checkpoint_hooks`)::

    checkpoint-<step>/
      <role>/                              one PEFT adapter folder per model that carries the
        adapter_config.json                adapter (``diffadapt.save_adapter(model, ...)``): any
        adapter_model.safetensors          checkpoint loads with ``diffadapt.load_adapter``
      <role>.trained_weights.safetensors   what else trains in that model (a ControlNet's new
                                           layers, or all of it), by parameter name
      optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (accelerate)
      diffadapt_checkpoint.json            the manifest, written last (see read_manifest)

Resuming copies the saved values into the run's own parameters, in place (the optimizer keeps
its references), bit for bit. Checkpoints of diffadapt 0.1 (``<role>.trainable.safetensors``:
every trained tensor by parameter name) still resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file

from diffadapt.checkpoint import CheckpointError
from diffadapt.model import adapter_config, adapter_parameters, unwrap
from diffadapt.pipeline import hotswap_adapter, save_adapter

MANIFEST = "diffadapt_checkpoint.json"  # written last: its presence means the folder is complete
MANIFEST_FORMAT = "diffadapt.training-checkpoint"
TRAINED_WEIGHTS = "{role}.trained_weights.safetensors"
OLD_TRAINABLE = "{role}.trainable.safetensors"  # diffadapt 0.1 checkpoints: every trained tensor
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
LEFTOVER_RE = re.compile(r"checkpoint-\d+\.(tmp|old)")


# -- seeds, data order, precision ------------------------------------------------------------------
def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen weights under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def autocast(accelerator) -> contextlib.AbstractContextManager:
    """Autocast for inference with mixed-precision weights (fp32 VAE and adapters), else nothing."""
    if accelerator.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(accelerator.device.type)


def step_generator(accelerator, seed: int, global_step: int, micro: int) -> torch.Generator:
    """Noise, timesteps and VAE samples of one micro-batch: a function of (seed, step, micro-batch,
    rank) only, so a resumed run draws exactly what an uninterrupted one draws."""
    index = (global_step * 1024 + micro) * accelerator.num_processes + accelerator.process_index
    return torch.Generator(accelerator.device).manual_seed((seed * 1_000_003 + index) % (2**63))


def seed_global_rngs(seed: int, global_step: int, micro: int, rank: int) -> None:
    """Seed the global generators (python ``random``, numpy, torch on the CPU and every
    accelerator device) for one micro-batch, from (seed, step, micro-batch, rank) only.

    Adapter dropout (BOFT ``boft_dropout``, OFT ``module_dropout``, FRoD ``frod_dropout``) and
    anything else that draws inside the forward uses these global generators. Their state at a
    checkpoint is not what a resumed run has at the same step: between ``load_state`` and the
    next step other code draws from them (a new DataLoader iterator takes a seed from torch's
    CPU generator, accelerate synchronises generators per iteration, ...). Seeding them per
    micro-batch makes a resumed run draw exactly what the uninterrupted one draws, whatever ran
    in between. The stream differs from ``step_generator``'s (noise and timesteps)."""
    digest = hashlib.sha256(f"diffadapt global rng {seed} {global_step} {micro} {rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") >> 1  # 63 bits
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # CPU and all CUDA (and other accelerator) devices


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
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


# -- optimizer, schedule, gradients ----------------------------------------------------------------
def make_optimizer(param_groups, lr: float, betas=(0.9, 0.999), weight_decay: float = 1e-2, eps: float = 1e-8,
                   use_8bit_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW8bit with ``use_8bit_adam``."""
    if use_8bit_adam:
        import bitsandbytes as bnb  # optional dependency, only for this choice

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                      power: float = 1.0, num_processes: int = 1):
    """diffusers' ``get_scheduler``; steps counted as accelerate's prepared scheduler counts them
    (once per process)."""
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes, num_cycles=num_cycles, power=power)


def average_gradients(params) -> None:
    """The gradients of replicated parameters averaged over the processes, as DDP does (divided
    by the world size, then summed; one flat all-reduce). For parameters FSDP leaves out."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(torch.distributed.get_world_size())
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` (adapter parameters, and e.g. a trained ControlNet)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# -- checkpoints whose trained parts are adapters --------------------------------------------------
def _other_trained(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The trained parameters that are not ``adapter_name``'s adapter parameters, by name."""
    adapter = set() if adapter_config(model, adapter_name) is None else {
        id(p) for p in adapter_parameters(model, adapter_name).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter}


def save_trained(model: torch.nn.Module, folder, role: str, adapter_name: str = "default",
                 base_model: Optional[str] = None) -> None:
    """Write what trains in ``model`` into ``folder``: its adapter as the PEFT folder
    ``<role>/`` and any other trained tensors as ``<role>.trained_weights.safetensors``."""
    model = unwrap(model)
    if adapter_config(model, adapter_name) is not None:
        save_adapter(model, Path(folder, role), adapter_name, metadata={"base_model": base_model})
    other = _other_trained(model, adapter_name)
    if other:
        save_file({n: p.detach().cpu().contiguous() for n, p in other.items()},
                  str(Path(folder, TRAINED_WEIGHTS.format(role=role))))


def _copy_tensors(path: Path, params: dict[str, torch.nn.Parameter]) -> None:
    """The tensors of ``path`` copied into ``params`` (same names and shapes, checked first)."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}).") from None
    hint = "resume with the same method, hyper-parameters and targets"
    if set(tensors) != set(params):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise CheckpointError(f"{path} holds other tensors than this run trains ({len(tensors)} vs {len(params)}; "
                              f"e.g. {(extra or missing)[0]!r} {'only there' if extra else 'missing'}); {hint}.")
    for n, p in params.items():
        if tuple(tensors[n].shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: {n} has shape {tuple(tensors[n].shape)} there and {tuple(p.shape)} in "
                                  f"this run; {hint}.")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


def load_trained(model: torch.nn.Module, folder, role: str, adapter_name: str = "default") -> None:
    """Copy what :func:`save_trained` wrote for ``role`` back into ``model``'s own parameters, in
    place. A diffadapt 0.1 checkpoint (``<role>.trainable.safetensors``) is read too."""
    model, folder = unwrap(model), Path(folder)
    old = folder / OLD_TRAINABLE.format(role=role)
    if not (folder / role).is_dir() and old.is_file():
        _copy_tensors(old, {n: p for n, p in model.named_parameters() if p.requires_grad})
        return
    if adapter_config(model, adapter_name) is not None:
        if not (folder / role).is_dir():
            raise CheckpointError(f"{folder} has no {role}/ adapter folder: not a checkpoint of this training.")
        hotswap_adapter(model, folder / role, adapter_name)
    other = _other_trained(model, adapter_name)
    weights = folder / TRAINED_WEIGHTS.format(role=role)
    if other or weights.exists():
        if not weights.is_file():
            raise CheckpointError(f"{folder} has no {weights.name}: its {role} trained only its adapter, this run "
                                  f"trains {len(other)} more tensors (e.g. {next(iter(other))!r}).")
        _copy_tensors(weights, other)


def register_checkpoint_hooks(accelerator, models: dict, adapter_name: str = "default",
                              base_model: Optional[str] = None, unprepared: bool = False) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` store only what trains, each model role
    in the adapter format (:func:`save_trained`) instead of the whole frozen model; optimizer,
    lr scheduler, step and RNG states are saved by accelerate as usual (diffusers' scripts'
    ``register_save_state_pre_hook`` pattern). ``models``: role -> model as trained (unwrapped).
    ``unprepared`` (e.g. FSDP-sharded models not given to ``accelerator.prepare``): every role
    is saved and loaded (its trained tensors are replicated: the main process writes them, every
    process reads them)."""

    def roles_of(given) -> list[tuple[int, str]]:
        found = []
        for i, model in enumerate(given):
            inner = accelerator.unwrap_model(model)
            role = next((r for r, m in models.items() if m is inner), None)
            if role is not None:
                found.append((i, role))
        return found

    def save_hook(saved_models, weights, output_dir):
        found = roles_of(saved_models)
        roles = list(models) if unprepared else [r for _, r in found]
        if accelerator.is_main_process:
            for role in roles:
                save_trained(models[role], output_dir, role, adapter_name, base_model)
        for i, _ in reversed(found):  # accelerate writes no model file for them
            if i < len(weights):
                weights.pop(i)

    def load_hook(loaded_models, input_dir):
        found = roles_of(loaded_models)
        for role in list(models) if unprepared else [r for _, r in found]:
            load_trained(models[role], input_dir, role, adapter_name)
        for i, _ in reversed(found):
            loaded_models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# -- checkpoint folders and their manifest ---------------------------------------------------------
def checkpoint_step(name: str) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name (None for any other name)."""
    match = CHECKPOINT_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir) -> list[str]:
    """``checkpoint-<step>`` folder names in ``output_dir``, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir)
             if checkpoint_step(d) is not None and os.path.isdir(os.path.join(output_dir, d))]
    return sorted(names, key=checkpoint_step)


def read_manifest(path) -> Optional[dict]:
    """The manifest of a checkpoint folder, or None (none there, unreadable, or not ours)."""
    try:
        data = json.loads(Path(path, MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def folder_files(folder) -> dict[str, int]:
    """Every file under ``folder`` (relative, ``/``-separated) with its size, for the manifest."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder).replace(os.sep, "/")] = os.path.getsize(p)
    return out


def checkpoint_problem(path) -> Optional[str]:
    """None if the checkpoint folder is complete (every file its manifest lists, at its size),
    else why not (one clause)."""
    if not Path(path, MANIFEST).is_file():
        return (f"it has no {MANIFEST} (a save that did not finish, or a checkpoint of an older version of the "
                "script)")
    manifest = read_manifest(path)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return f"its {MANIFEST} is unreadable"
    for rel, size in sorted(manifest["files"].items()):
        file = Path(path, rel)
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {size} were written (truncated or damaged)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def prune_checkpoints(output_dir, keep, total_limit: Optional[int] = None) -> None:
    """Leftovers of killed saves (``checkpoint-<step>.tmp`` / ``.old``) go; with ``total_limit``
    n the n newest complete checkpoints stay (``keep``, the one just written, among them), older
    complete ones go. Incomplete ``checkpoint-<step>`` folders are left alone: they do not count,
    and an older script's checkpoint may be one."""
    out = Path(output_dir)
    for name in os.listdir(out):
        if LEFTOVER_RE.fullmatch(name) and out / name != Path(keep):
            _remove(out / name)
    if total_limit is None:
        return
    complete = [d for d in list_checkpoints(out) if checkpoint_problem(out / d) is None]
    kept = set(complete[-total_limit:]) | {Path(keep).name}
    for name in complete:
        if name not in kept:
            shutil.rmtree(out / name)
