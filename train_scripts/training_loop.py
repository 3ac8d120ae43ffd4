"""The training loop both scripts run, with its accelerate glue: the Accelerator, the optimizer
and schedule from the flags, checkpoints (``diffadapt.training``: each trained model as an
adapter), resume (``latest``, checked against this run), rank digests (tests), train_log.jsonl;
and loading the base pipeline at the start of a run. What does not depend on the scripts' flags
(seeds, data order, optimizer and schedule construction, checkpoint folders and their manifest)
is in ``diffadapt.training``.

``logger`` is the scripts' one logger; ``make_accelerator`` configures logging (once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import diffusers
import huggingface_hub
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm

import atomic_io
from common import ADAPTER_NAME, METHOD_FLAGS, METHODS, UsageError, tensorboard_available
from diffadapt import notices, quantized, training
from diffadapt.model import adapter_config
from diffadapt.training import (  # noqa: F401 - the scripts use them from here too
    EpochSampler,
    autocast,
    checkpoint_problem,
    read_manifest,
    step_generator,
    trainable_state,
    weight_dtype,
)

logger = logging.getLogger("train_scripts")


def verbose(args) -> bool:
    """--verbose: every library's loading and info logs. A script without the flag logs everything."""
    return getattr(args, "verbose", True)


def quiet_library_logs(args) -> None:
    """Without --verbose, before diffusers / transformers are imported: no notices about optional
    pieces the run does not use (:data:`diffadapt.notices.IMPORT_NOTICES`: transformers' torchvision
    fallback, torchao's CUDA extensions on a CPU build, ...; bitsandbytes' optional CPU 4-bit kernel
    is kept with --quantize_base). Warnings about the model itself stay (see ``start_run``)."""
    if verbose(args):
        return
    notices.quiet_import_notices(keep=("bitsandbytes.backends.cpu.ops",) if getattr(args, "quantize_base", None) else ())


def make_accelerator(args, find_unused_parameters: bool = False):
    """The Accelerator for the flags; logging configured here, the one place (format and level:
    INFO with --verbose, else WARNING)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO if verbose(args) else logging.WARNING)

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
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # `accelerate launch --use_fsdp`: the scripts shard themselves (see shard_models; accelerate's
        # plugin would shard the adapters too, and has no CPU path); accelerate sets up plain data parallelism
        args.fsdp = True
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        if getattr(args, "quantize_base", None):
            raise UsageError(f"accelerate launch --use_fsdp with --quantize_base {args.quantize_base} is not supported "
                             "yet (FSDP cannot shard the quantized storage): use one of them.")
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


def to_device(model, device, dtype) -> None:
    """Move a model, casting it only for mixed precision (the trained tensors are cast back to
    fp32 with diffusers.training_utils.cast_training_params afterwards). A quantized base's
    bitsandbytes layers are moved, never cast (their storage is the quantized weight; they compute
    in the dtype of their input); every other tensor is moved and cast as for a float model."""
    kept = [m for m in model.modules() if quantized.is_quantized(m)]
    if not kept:
        model.to(device) if dtype == torch.float32 else model.to(device, dtype=dtype)
        return
    skip = {id(m) for m in kept}
    for module in model.modules():
        if id(module) in skip:
            if module.weight.device != torch.device(device):
                module.to(device)
            continue
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None:
                continue
            cast = t.to(device, dtype=dtype) if t.is_floating_point() and dtype != torch.float32 else t.to(device)
            if cast is not t:
                t.data = cast


def quantize_base(args, accelerator, pipe, denoisers, text_encoders, pin: bool = True) -> None:
    """--quantize_base: the Linear layers of the ``denoisers`` components of ``pipe`` (and of the
    ``text_encoders`` with --quantize_text_encoder) replaced with bitsandbytes layers
    (``diffadapt.quantized.quantize_model``), each moved to the training device and quantized there,
    before any adapter is added. diffusers' ``BitsAndBytesConfig`` (``from_pretrained(...,
    quantization_config=...)``) gives the same layer types but refuses to load without a GPU
    ("No GPU found"), so the scripts swap the layers themselves, on every device.

    ``pin``: the layers keep their training kernels under ``eval()`` (validation images and class
    images between training steps; see ``diffadapt.quantized.pin_training_kernels``)."""
    if not getattr(args, "quantize_base", None):
        return
    roles = list(denoisers) + (list(text_encoders) if args.quantize_text_encoder else [])
    compute = weight_dtype(accelerator)
    done = []
    for role in roles:
        model = getattr(pipe, role, None)
        if model is None:
            continue
        names = quantized.quantize_model(model, args.quantize_base, double_quant=True, compute_dtype=compute,
                                         device=accelerator.device)
        model.requires_grad_(False)
        if pin:
            quantized.pin_training_kernels(model)
        if names:
            done.append(f"{role} {len(names)} ({quantized.describe(model.get_submodule(names[0]))})")
    accelerator.print(f"--quantize_base {args.quantize_base}: Linear layers quantized: {'; '.join(done) or 'none'}")


def shared_seed(args, accelerator) -> int:
    """--seed, or when resuming without it the checkpoint's seed (data order, noise and dropout
    follow the seed: a new one would not continue the run), or one random seed agreed by all
    processes (data order must match across ranks)."""
    path = getattr(args, "resume_path", None)
    manifest = read_manifest(path) if path else None
    saved = manifest.get("seed") if manifest else None
    saved = saved if isinstance(saved, int) and not isinstance(saved, bool) else None
    if args.seed is not None:
        if saved is not None and saved != args.seed and accelerator.is_main_process:
            logger.warning(f"warning: --seed {args.seed} differs from the seed of {path} ({saved}); data order, noise "
                    "and dropout do not continue that run's.")
        return args.seed
    if saved is not None:
        accelerator.print(f"No --seed given: resuming with the seed of {path} ({saved}).")
        return saved
    return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]


def make_optimizer(args, param_groups):
    return training.make_optimizer(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                   use_8bit_adam=args.use_8bit_adam)


def make_lr_scheduler(args, optimizer, accelerator):
    return training.make_lr_scheduler(args.lr_scheduler, optimizer, args.lr_warmup_steps, args.max_train_steps,
                                      num_cycles=args.lr_num_cycles, power=args.lr_power,
                                      num_processes=accelerator.num_processes)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text if len(text) <= 240 else text[:240] + ' ...'}"


# ----------------------------------------------------------------------------------------------
# checkpoints: written into checkpoint-<step>.tmp, renamed when complete, described by a manifest
# ----------------------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def run_signature(args, models: dict) -> dict:
    """What a checkpoint must share with the run that resumes it: the method, the trained roles,
    each role's adapter config and every trained tensor's name and shape."""
    adapters, trainable = {}, {}
    for role, model in models.items():
        config = adapter_config(model, ADAPTER_NAME)  # None: no adapter (e.g. a ControlNet trained in full)
        if config is not None:
            adapters[role] = config.to_dict()
        trainable[role] = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    signature = {"method": args.method, "adapters": adapters, "trainable": trainable}
    return json.loads(json.dumps(signature, sort_keys=True, default=_jsonable))  # as it reads back


def save_checkpoint(accelerator, args, global_step: int, models: dict) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, atomically: all processes
    write into ``checkpoint-<step>.tmp`` (accelerate writes models/optimizer on the main process and
    each process's RNG state), the main process adds the manifest, flushes and renames it; only
    then are checkpoints beyond ``--checkpoints_total_limit`` removed (complete ones, oldest first).
    The trained models are written as adapters by the hooks of ``prepare``
    (``diffadapt.training.register_checkpoint_hooks``)."""
    path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    tmp = path + ".tmp"
    if accelerator.is_main_process:
        atomic_io.remove(tmp)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = {"format": training.MANIFEST_FORMAT, "version": 2, "step": global_step, "seed": args.seed_value,
                    "world_size": accelerator.num_processes, **run_signature(args, models),
                    "files": training.folder_files(tmp)}
        Path(tmp, training.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        atomic_io.fsync_tree(tmp)
        atomic_io.replace_dir(tmp, path)
        training.prune_checkpoints(args.output_dir, keep=path, total_limit=args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return path


def resolve_resume(args, warn=logger.warning) -> str | None:
    """The checkpoint folder --resume_from_checkpoint names (None: start fresh). ``latest`` is the
    newest complete checkpoint in --output_dir; incomplete ones are skipped with a ``warn`` line."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        for name in reversed(training.list_checkpoints(args.output_dir)):
            path = os.path.join(args.output_dir, name)
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            warn(f"warning: skipping {path} for --resume_from_checkpoint latest: {problem}.")
        return None
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or training.checkpoint_step(os.path.basename(os.path.normpath(path))) is None:
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint-<step> folder there.")
    problem = checkpoint_problem(path)
    if problem is not None:
        if Path(path, training.MANIFEST).exists():
            named = "" if path == args.resume_from_checkpoint else f" ({path})"
            raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}{named} cannot be resumed: "
                             f"{problem}.")
        warn(f"warning: {path}: {problem}; trying to load it anyway.")
    return path


def find_resume(args) -> str | None:
    """``resolve_resume`` once per run, early (before the models load: a damaged or missing
    checkpoint is refused at once); the first process prints the warnings."""
    if not hasattr(args, "resume_path"):
        first = os.environ.get("RANK", "0") == "0"
        args.resume_path = resolve_resume(args, logger.warning if first else (lambda _: None))
    return args.resume_path


# flag spelling of a config field in an error message: (method, field) -> flag
FIELD_FLAGS = {(method, field_name): flag for flag, (method, field_name, _, _) in METHOD_FLAGS.items()}
FIELD_FLAGS.update({(m, "target_modules"): "target_modules" for m in METHODS})


def _setting(method: str, name: str, value) -> str:
    flag = FIELD_FLAGS.get((method, name))
    if flag is None:
        return f"{name}={json.dumps(value)} (--adapter_config)"
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value if not isinstance(value, (list, dict)) else json.dumps(value)}"


def check_same_run(where: str, manifest: dict, current: dict) -> None:
    """Refuse (one line) a checkpoint whose method, trained roles, adapter configs or trained
    tensor shapes differ from this run's: the first difference, with the flags that set it."""
    hint = "resume with the checkpoint's settings, or train into a new --output_dir"
    if manifest.get("method") != current["method"]:
        raise UsageError(f"{where} was trained with --method {manifest.get('method')}, this run has --method "
                         f"{current['method']}; {hint}.")
    method = current["method"]
    old, new = manifest.get("trainable") or {}, current["trainable"]
    if sorted(old) != sorted(new):
        raise UsageError(f"{where} trained {', '.join(sorted(old)) or 'nothing'}, this run trains "
                         f"{', '.join(sorted(new))} (--train_text_encoder / --adapt / --controlnet_trainable); {hint}.")
    old_adapters, new_adapters = manifest.get("adapters") or {}, current["adapters"]
    for role in sorted(set(old_adapters) | set(new_adapters)):
        a, b = old_adapters.get(role), new_adapters.get(role)
        if a is None or b is None:
            raise UsageError(f"{where}: the {role} {'had no' if a is None else 'had an'} adapter there, "
                             f"{'has one' if a is None else 'has none'} in this run; {hint}.")
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                raise UsageError(f"{where}: its {role} adapter was trained with {_setting(method, name, a.get(name))}, "
                                 f"this run has {_setting(method, name, b.get(name))}; {hint}.")
    for role in sorted(new):
        for name in sorted(set(old[role]) | set(new[role])):
            if old[role].get(name) != new[role].get(name):
                raise UsageError(f"{where}: {role} tensor {name} has shape {old[role].get(name)} there and "
                                 f"{new[role].get(name)} in this run; {hint}.")


def check_resume(args, models: dict) -> str | None:
    """The checkpoint to resume from (None: start fresh), checked against this run's method,
    trained roles, adapter configs and tensor shapes. The scripts call it as soon as the
    adapters are in (before data, class images, devices), ``resume`` again (once resolved)."""
    path = find_resume(args)
    if path is not None:
        manifest = read_manifest(path)
        if manifest is not None:
            where = f"--resume_from_checkpoint {args.resume_from_checkpoint} ({path})"
            check_same_run(where, manifest, run_signature(args, models))
    return path


def resume(accelerator, args, steps_per_epoch: int, models: dict) -> tuple[int, int, int]:
    """Load the checkpoint if asked; returns (global_step, first_epoch, batches to skip)."""
    path = check_resume(args, models)
    if path is None:
        if args.resume_from_checkpoint:
            accelerator.print(f"No complete checkpoint in {args.output_dir}; starting a new training run.")
        return 0, 0, 0
    where = f"--resume_from_checkpoint {args.resume_from_checkpoint} ({path})"
    accelerator.print(f"Resuming from {path}")
    try:
        accelerator.load_state(path)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged optimizer / scheduler / RNG file of any kind
        raise UsageError(f"{where} cannot be loaded: {one_line(err)}") from None
    global_step = training.checkpoint_step(os.path.basename(os.path.normpath(path)))
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
            "sha256": digest.hexdigest(), "sum": total, "numel": count, "saved_artifact": saved,
            "base": base_layout(models)}
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(info, indent=2))


def fsdp_active(accelerator, args) -> bool:
    return bool(getattr(args, "fsdp", False)) and accelerator.num_processes > 1


def shard_models(accelerator, models: dict) -> None:
    """--fsdp: torch FSDP2 ``fully_shard`` on each trained model, bottom-up: one unit per block
    class in the model's ``_no_split_modules`` (diffusers / transformers name their transformer
    and resnet blocks there), then the model itself. The frozen base weights are sharded across
    the processes and gathered block by block in forward and backward.

    The trained parameters (adapters, a trained ControlNet) are left out (``ignored_params``): they
    stay plain, replicated tensors and ``average_gradients`` all-reduces their gradients as DDP
    does. Sharded, they break diffadapt's adapter plan: its forward pre-hook on the model prepares
    every layer's factors at once (batched across layers) before any block's FSDP hook has
    gathered that block's parameters, so the factors are DTensor shards and the layer's forward
    mixes them with plain tensors ("aten.mul.Tensor got mixed torch.Tensor and DTensor", e.g.
    FourierFT's delta_weight)."""
    from torch.distributed.device_mesh import init_device_mesh  # --fsdp only
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for model in models.values():
        trained = {p for p in model.parameters() if p.requires_grad}
        if len(trained) == len(list(model.parameters())):  # trained in full (a ControlNet): nothing frozen
            continue
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in blocks and m is not model]
        for module in reversed(units):  # children before their parents
            if not isinstance(module, FSDPModule) and any(not p.requires_grad for p in module.parameters()):
                fully_shard(module, mesh=mesh, ignored_params=trained)
        fully_shard(model, mesh=mesh, ignored_params=trained)
        if accelerator.native_amp:  # autocast as accelerate gives a prepared model
            from accelerate.utils import convert_outputs_to_fp32  # --fsdp with mixed precision only
            from accelerate.utils.modeling import get_mixed_precision_context_manager

            context = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
            model.forward = convert_outputs_to_fp32(context(model.forward))
    torch.distributed.barrier()


def base_layout(models: dict) -> dict:
    """Debug/tests: per role, the frozen parameters' global element count, the elements this
    process holds and how many are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor  # torch.distributed: not on every build

    out = {}
    for role, model in models.items():
        frozen = [p for p in model.parameters() if not p.requires_grad]
        local = [p.to_local() if isinstance(p, DTensor) else p for p in frozen]
        out[role] = {"numel": sum(p.numel() for p in frozen), "local_numel": sum(t.numel() for t in local),
                     "sharded": sum(isinstance(p, DTensor) for p in frozen), "params": len(frozen)}
    return out


def prepare(accelerator, args, models: dict, groups: list, dataloader):
    """optimizer + lr schedule + ``accelerator.prepare``; returns (wrapped models by role,
    optimizer, dataloader, lr scheduler, updates per epoch). ``groups``: optimizer param groups.
    With --fsdp the models are sharded here (``shard_models``) and not given to accelerate (it
    would wrap them in DDP)."""
    fsdp = fsdp_active(accelerator, args)
    if fsdp:
        shard_models(accelerator, models)  # the trained parameters are the same objects afterwards
    optimizer = make_optimizer(args, groups)
    training_plan(args, math.ceil(len(dataloader) / accelerator.num_processes))  # before sharding
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator)
    roles = [] if fsdp else list(models)
    prepared = accelerator.prepare(*[models[r] for r in roles], optimizer, dataloader, lr_scheduler)
    wrapped = dict(models) if fsdp else dict(zip(roles, prepared[: len(roles)]))
    optimizer, dataloader, lr_scheduler = prepared[len(roles):]
    steps_per_epoch = training_plan(args, len(dataloader))  # after sharding
    training.register_checkpoint_hooks(accelerator, models, ADAPTER_NAME, args.pretrained_model_name_or_path,
                                       unprepared=fsdp)
    return wrapped, optimizer, dataloader, lr_scheduler, steps_per_epoch


def train(accelerator, args, *, models, wrapped, optimizer, lr_scheduler, dataloader, steps_per_epoch,
          epoch_users, loss_fn, validate_fn=None) -> int:
    """The loop both scripts run (diffusers' structure): resume, epochs, gradient accumulation,
    clipping, checkpoints every --checkpointing_steps, validation every --validation_steps (main
    process), tqdm with loss and lr, tracker + train_log.jsonl. Returns the final global step.

    ``loss_fn(batch, generator)`` returns the loss of one micro-batch; ``epoch_users`` get
    ``use_epoch``/``epoch`` set (sampler, dataset) so data order and augmentation follow the epoch."""
    global_step, first_epoch, skip = resume(accelerator, args, steps_per_epoch, models)
    log = JsonlLog(accelerator, args.output_dir, global_step)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fsdp = fsdp_active(accelerator, args)
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
                training.seed_global_rngs(args.seed_value, global_step, micro, accelerator.process_index)
                loss = loss_fn(batch, step_generator(accelerator, args.seed_value, global_step, micro))
                accelerator.backward(loss)
                if accelerator.sync_gradients and fsdp:
                    training.average_gradients(params)
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
                    saved = save_checkpoint(accelerator, args, global_step, models)
                    if accelerator.is_local_main_process:  # above the progress bar, which stays whole
                        progress.write(f"Saved state to {saved}")
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
    since the loop (re)started - readable without trackers. A resumed run keeps the lines up to
    its checkpoint's step (a killed run may have logged steps after it, which it trains again)."""

    def __init__(self, accelerator, output_dir, resume_step: int):
        self.path = Path(output_dir, "train_log.jsonl") if accelerator.is_main_process else None
        if self.path is None or not self.path.exists():
            return
        if resume_step == 0:
            self.path.unlink()
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= resume_step:
                kept.append(line + "\n")
        atomic_io.write_text_atomic(self.path, "".join(kept))

    def write(self, **values) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(values) + "\n")


def start_run(args, accelerator, family: str):
    """Per-process logging, the shared seed, the output folder; then the base pipeline."""
    if accelerator.is_local_main_process and verbose(args):
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    elif accelerator.is_local_main_process:  # warnings (e.g. weights missing from a checkpoint) only, no loading bars
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()  # downloads of a hub model keep theirs
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
    from diffusers import DiffusionPipeline  # here, after quiet_library_logs: this import logs bitsandbytes notices

    load = dict(revision=args.revision, variant=args.variant)
    if family == "sd":
        load.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **load)
