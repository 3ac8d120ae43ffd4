"""What train_dreambooth.py and train_controlnet.py share at the command line, and nothing else.

* refusing bad input: ``UsageError``, ``fail`` (one line on stderr, exit code 2, no traceback)
  and ``guarded`` (turns UsageError / AdapterConfigError / CheckpointError into that line);
* argument groups: the diffusers training flags both scripts use, and the adapter flags
  (``--method``, each method's hyper-parameters, ``--adapter_config``, targets), built from the
  method registry (``diffadapt.methods``: the methods, their config fields' flag metadata and
  their training defaults), so a method registered with ``diffadapt.methods.register`` gets its
  flags here without an edit;
* adapter configs from those flags, and injection (presets, ControlNetModel workaround);
* model folders: reading ``model_index.json`` to tell the family.

The rest of the shared code: ``training_loop.py`` (accelerate, checkpoints, resume, the loop)
and ``sd_parts.py`` (prompt encoding, noise and loss, images, grids, the model card).

The registry (``diffadapt.methods``; it loads torch, about 2 s) is imported with this module:
every adapter flag comes from it. diffusers and the models are imported inside functions, after
the arguments are checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import diffadapt as da
from diffadapt.host import SUPPORTED_LAYERS, layer_spec
from diffadapt.methods import AdapterConfigError, config_flags, get_method, method_names
from diffadapt.model import resolve_targets
from diffadapt.targets import select_targets

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


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def guarded(main):
    """Run ``main(argv)``; known refusals become one stderr line and exit code 2, running out of
    memory one line and exit code 1."""

    def run(argv=None):
        try:
            return main(argv)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a refusal
            if isinstance(err, _refusals()):
                fail(err)
            if _out_of_memory(err):
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                fail(f"out of memory ({first}); lower --train_batch_size or --resolution, or use "
                     "--gradient_checkpointing / --mixed_precision.", code=1)
            raise

    return run


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line too (instead of usage + message); float flags must be
    finite (``float("nan")`` and ``float("inf")`` parse, and would fail deep inside torch)."""

    def error(self, message):
        fail(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            if action.type is not float:
                continue
            value = getattr(parsed, action.dest, None)
            for v in value if isinstance(value, list) else [value]:
                if v is not None and not math.isfinite(v):
                    self.error(f"argument {'/'.join(action.option_strings)}: must be a finite number, got {v}")
        return parsed


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
    g.add_argument("--quantize_base", choices=QUANT_TYPES, default=None,
                   help="Quantize the frozen denoiser's Linear layers with bitsandbytes before the adapters are "
                   "added (nf4 / fp4: 4-bit, double-quantized; int8: LLM.int8 weights), QLoRA-style; the adapters "
                   "train in float32 on top and the saved files are those of a float base.")
    g.add_argument("--quantize_text_encoder", action="store_true",
                   help="With --quantize_base: quantize the text encoders' Linear layers too.")


QUANT_TYPES = ("nf4", "fp4", "int8")


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
    g.add_argument("--fsdp", action="store_true",
                   help="With several processes: shard the frozen base of the trained models across them (torch "
                   "FSDP2 fully_shard, one unit per transformer/resnet block) instead of a full copy per process; "
                   "the adapter stays replicated and its gradients are averaged as under DDP. For bases that do "
                   "not fit one device; DDP (the default) is faster. `accelerate launch --use_fsdp` sets it.")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="Default depends on --method (its Method.learning_rate in diffadapt/methods/).")
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


def method_flags() -> dict:
    """flag -> (method, config field, type, help) of every registered method's config fields that
    declare a flag (``diffadapt.methods.config_flags``). A flag left out (None) means "not given":
    the config's default applies."""
    return {f.flag: (name, f.field, f.type, f.help) for name in method_names() for f in config_flags(get_method(name))}


# the methods registered when the scripts start (what --method offers is read when a parser is built)
METHOD_FLAGS = method_flags()
METHODS = method_names()


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adapter (diffadapt)")
    g.add_argument("--method", default=None, choices=method_names(),
                   help="Adapter method (required, except on the embedded model, where both scripts default to one).")
    for flag, (method, _, kind, help_text) in method_flags().items():
        if kind is bool:
            g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(f"--{flag}", type=kind, default=None, help=help_text)
    g.add_argument("--adapter_config", default=None,
                   help="JSON object (or a path to a .json file) with any other config fields, e.g. "
                   '\'{"init_weights": true, "overrides": {"attn2.to_k": {"boft_block_size": 8}}}\'. '
                   "Explicit flags win over it.")
    g.add_argument("--target_preset", choices=["attention", "attention+ff"], default=None,
                   help="Layers to adapt per architecture (default attention); derived from the model's attention / feed-forward modules.")
    g.add_argument("--target_modules", default=None,
                   help="Instead of a preset: comma-separated module-name suffixes (to_q,to_v), "
                   "one regex (full match), or all-linear.")


def adapter_fields(args) -> dict:
    """Config fields: the method's ``training_defaults``, then --adapter_config, then the method
    flags; refuses other methods' flags."""
    fields = dict(get_method(args.method).training_defaults)
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
    for flag, (method, field_name, _, _) in method_flags().items():
        value = getattr(args, flag, None)
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
    fields = adapter_fields(args)
    if target_modules is not None:
        fields["target_modules"] = target_modules
    config_class = get_method(args.method).config_class
    try:  # the config checks its overrides' fields and values itself
        return config_class.from_dict(fields)
    except TypeError as err:  # a field of the wrong kind in --adapter_config
        raise AdapterConfigError(f"{args.method} config from the flags / --adapter_config: {err}") from None
    except AdapterConfigError as err:
        if "override" not in str(err):
            raise
        raise UsageError(f"--adapter_config overrides: {' '.join(str(err).split())}") from None


def inject(model, config, preset: str | None, role: str) -> list[str]:
    """``diffadapt.add_adapter`` with the preset resolved; names the component in errors."""
    preset = None if config.target_modules else preset
    try:
        check_sizes(model, config, preset, role)
        return da.add_adapter(model, config, ADAPTER_NAME, preset=preset)
    except AdapterConfigError as err:
        raise AdapterConfigError(f"{role} ({type(model).__name__}): {err}") from None


def check_sizes(model, config, preset, role: str) -> None:
    """Sizes that a flag can make unbounded, checked against the target layers' widths before
    anything is allocated (the method's own layer checks run while its tensors are built).

    HRA: ``r`` Householder vectors of ``fan_in`` features per layer; more than ``fan_in``
    reflections are redundant (every rotation is a product of at most ``fan_in`` of them), and
    ``--hra_r 100000000`` would allocate r x fan_in floats per layer before anything fails.
    BOFT: ``m`` butterfly factors need ``2^(m-1)`` to divide the block count, so ``2^(m-1)``
    cannot exceed the rotated width (checked without computing ``2^(m-1)``: for
    ``--boft_n_butterfly_factor 100000`` that number has 30,000 digits)."""
    if config.method not in ("hra", "boft"):
        return
    resolved = resolve_targets(model, config, preset)
    specs = [layer_spec(n, model.get_submodule(n)) for n in select_targets(model, resolved, SUPPORTED_LAYERS)]
    for spec in specs:
        layer_config = resolved.for_layer(spec.name)
        if config.method == "boft":
            m = layer_config.boft_n_butterfly_factor
            width = spec.out_features if getattr(layer_config, "rotation_side", "input") == "output" else spec.fan_in
            if m > width.bit_length():  # 2^(m-1) > width
                source = ("--boft_n_butterfly_factor" if m == config.boft_n_butterfly_factor
                          else "an --adapter_config override")
                raise UsageError(
                    f"{source} {m} does not fit {role} layer {spec.describe()}: m butterfly factors need at least 2^(m-1) "
                    f"blocks, and the layer is {width} wide; use {source} <= {width.bit_length()} "
                    "(fewer where the block count is not a power of two).")
            continue
        if layer_config.r > spec.fan_in:
            source = "--hra_r" if layer_config.r == config.r else "an --adapter_config override"
            raise UsageError(
                f"{source} {layer_config.r} does not fit {role} layer {spec.describe()}: HRA takes at most "
                f"fan_in={spec.fan_in} Householder reflections there; use {source} <= "
                f"{min(s.fan_in for s in specs)} for these layers (or overrides per layer).")


def check_common_args(args) -> None:
    """Cheap checks before anything heavy is imported or loaded (the config's own validation
    comes next, in main, with diffadapt imported; layer checks when the model is loaded)."""
    if args.method is None:
        raise UsageError(f"--method is required: one of {', '.join(method_names())}.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes); it is not installed.")
    if getattr(args, "quantize_text_encoder", False) and not args.quantize_base:
        raise UsageError("--quantize_text_encoder needs --quantize_base (nf4, fp4 or int8): the format to quantize in.")
    if getattr(args, "fsdp", False) and getattr(args, "quantize_base", None):
        raise UsageError(f"--fsdp with --quantize_base {args.quantize_base} is not supported yet (FSDP cannot shard "
                         "the quantized storage): use one of them.")
    if getattr(args, "quantize_base", None) and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"--quantize_base {args.quantize_base} needs bitsandbytes (pip install 'diffadapt[quantized]'); "
                         "it is not installed.")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UsageError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    check_numbers(args)
    if args.target_preset and args.target_modules:
        raise UsageError("Give either --target_preset or --target_modules, not both.")
    if args.report_to == "tensorboard" and not tensorboard_available():
        raise UsageError("--report_to tensorboard needs tensorboard (pip install tensorboard); it is not installed.")
    if args.learning_rate is None:
        args.learning_rate = get_method(args.method).learning_rate
    adapter_fields(args)  # flags of another method, bad --adapter_config JSON
    check_output_dir(args.output_dir)


_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_ABOVE_0 = (lambda v: v > 0, "> 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_PROBABILITY_BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")
# flag -> (test, what is allowed); flags a script does not have are skipped. Floats are finite
# already (Parser); what torch / numpy would refuse with a traceback, or silently misuse.
NUMBER_RANGES = {
    "learning_rate": _AT_LEAST_0,
    "text_encoder_lr": _AT_LEAST_0,
    "controlnet_lr": _AT_LEAST_0,
    "adam_beta1": _PROBABILITY_BELOW_1,
    "adam_beta2": _PROBABILITY_BELOW_1,
    "adam_epsilon": _AT_LEAST_0,
    "adam_weight_decay": _AT_LEAST_0,
    "max_grad_norm": _ABOVE_0,
    "lr_warmup_steps": _AT_LEAST_0,
    "lr_num_cycles": _AT_LEAST_1,
    "lr_power": _AT_LEAST_0,
    "dataloader_num_workers": _AT_LEAST_0,
    "snr_gamma": _ABOVE_0,
    "noise_offset": _AT_LEAST_0,
    "prior_loss_weight": _AT_LEAST_0,
    "num_class_images": _AT_LEAST_1,
    "sample_batch_size": _AT_LEAST_1,
    "max_sequence_length": _AT_LEAST_1,
    "max_train_samples": _AT_LEAST_1,
    "logit_std": _ABOVE_0,
    "mode_scale": _AT_LEAST_0,
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1] (numpy's seed range)"),
}


def check_numbers(args) -> None:
    """Ranges of the numeric training flags, each refused naming the flag, the value and what
    is allowed."""
    for flag, (ok, allowed) in NUMBER_RANGES.items():
        value = getattr(args, flag, None)
        if value is not None and not ok(value):
            raise UsageError(f"--{flag} must be {allowed}, got {value}.")


def check_output_dir(path) -> None:
    """--output_dir must be a folder this process can create and write (checked before anything
    is loaded; a failure here would otherwise come at the first checkpoint or the final save)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--output_dir {path} is not a writable folder ({err.strerror or err}).") from None


def tensorboard_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


# ----------------------------------------------------------------------------------------------
# model folders
# ----------------------------------------------------------------------------------------------


def pipeline_family(args, families: dict[str, str], script: str, supported: str) -> tuple[str, str]:
    """``(family, class name)`` of --pretrained_model_name_or_path, refused in one line when its
    pipeline class is not one of ``families`` (model_index.json ``_class_name`` -> family)."""
    class_name = pipeline_class_name(args.pretrained_model_name_or_path, args.revision)
    if class_name not in families:
        raise UsageError(f"{args.pretrained_model_name_or_path} is a {class_name}; {script} supports "
                         f"{', '.join(families)} ({supported}).")
    return families[class_name], class_name


def pipeline_class_name(model: str, revision=None) -> str:
    """``_class_name`` of a pipeline folder or hub repo's model_index.json."""
    if os.path.isdir(model):
        index = Path(model, "model_index.json")
        if not index.is_file():
            raise UsageError(f"{model} has no model_index.json: not a diffusers pipeline folder.")
        return json.loads(index.read_text()).get("_class_name", "?")
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--pretrained_model_name_or_path {model}: no such folder.")
    from diffusers import DiffusionPipeline  # hub ids only; diffusers loads after the argument checks

    try:
        return DiffusionPipeline.load_config(model, revision=revision).get("_class_name", "?")
    except Exception as err:  # noqa: BLE001 - hub / network errors of any kind
        raise UsageError(f"cannot read model_index.json of {model!r}: {type(err).__name__}: {err}") from None


def embedded_model_path() -> str:
    from diffadapt.defaults import default_model_path  # looked up per call (tests replace it)

    try:
        return default_model_path()
    except FileNotFoundError as err:
        raise UsageError(f"no --pretrained_model_name_or_path given and {err}") from None
