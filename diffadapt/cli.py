"""``diffadapt`` command line: generate with adapters, inspect adapter files, convert formats.

    diffadapt generate --adapter subject/:0.8 --prompt "a photo of sks hexagon" -o out.png
    diffadapt generate --model wan_folder/ --adapter motion/:0.8 --prompt "a cat walking" --num_frames 33 -o out.webp
    diffadapt info subject/
    diffadapt convert peft_folder/ adapter.safetensors --component unet
    diffadapt convert adapter.safetensors peft_out/ --to peft
    diffadapt convert adapter.safetensors for_comfy.safetensors --to comfyui --model base_pipeline/
    diffadapt convert lycoris_oft.safetensors adapter.safetensors --model base_pipeline/

Errors are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from diffadapt import notices


class CliError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``diffadapt generate: error: argument --steps: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _integer(low: int, high: Optional[int] = None, what: str = "an integer"):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return value

    return parse


def _finite(text: str) -> float:
    """argparse type: a finite number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _side(text: str) -> int:
    """argparse type: an image side, a positive multiple of 8 (the VAE's scale factor)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value <= 16384 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (e.g. 512), got {text!r}")
    return value


def _parse_adapter(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:STRENGTH`` (argparse type); a strength must be a finite number."""
    path, sep, strength = spec.rpartition(":")
    if sep and path:
        try:
            value = float(strength)
        except ValueError:
            return spec, 1.0  # a ':' that is part of the path
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"the strength of {path} must be a finite number, got {strength!r}")
        return path, value
    return spec, 1.0


def _load_pipeline(model: Optional[str], device: str, dtype: str):
    import torch
    from diffusers import DiffusionPipeline

    from diffadapt.defaults import default_model_path

    source = model or default_model_path()
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise CliError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars; the generation bar stays
    transformers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=getattr(torch, dtype))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise CliError(f"cannot load the pipeline {source!r}: {str(exc).splitlines()[0]}") from None
    finally:
        diffusers_logging.enable_progress_bar()
    return pipe.to(device)


def _pipeline_class(model: Optional[str]):
    """The pipeline class a local folder's model_index.json names (None: a hub id, or unknown), to
    check the flags and the output path before the weights load."""
    from diffadapt.defaults import default_model_path

    index = Path(model or default_model_path()) / "model_index.json"
    try:
        import diffusers

        return getattr(diffusers, json.loads(index.read_text())["_class_name"], None) if index.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None


def _check_output(pipe, args) -> bool:
    """Whether ``pipe`` (a pipeline or its class) makes videos; CliError for flags or an output path
    that do not fit what it makes."""
    from diffadapt import media

    name, video = (pipe if isinstance(pipe, type) else type(pipe)).__name__, media.is_video(pipe)
    if not video:
        for flag in ("num_frames", "fps"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag}: {name} makes images, not videos; leave out --{flag}")
    elif args.output is not None:
        try:
            media.check_output(args.output, name, video)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    return video


def _accepted(pipe, kwargs: dict) -> dict:
    """The arguments this pipeline's ``__call__`` takes (Flux.2 has no negative prompt, ...);
    unset ones (None) are left to the pipeline's defaults. A negative prompt it cannot take is an error."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if kwargs.get("negative_prompt") is not None and "negative_prompt" not in params and not open_ended:
        raise CliError(f"{type(pipe).__name__} takes no negative prompt; leave out --negative_prompt")
    return {k: v for k, v in kwargs.items() if v is not None and (open_ended or k in params)}


def cmd_generate(args) -> None:
    import torch

    import diffadapt as da
    from diffadapt import files, media

    try:
        torch.device(args.device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {args.device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    adapters = args.adapter or []  # (path, strength): parsed and checked by argparse
    for path, _ in adapters:  # fail fast, before the model loads (names and headers only)
        if not Path(path).exists():
            raise CliError(f"no adapter at {path}")
        files.peek(path)
    known = _pipeline_class(args.model)
    if known is not None:  # a local folder: the flags and --output checked before the weights load
        _check_output(known, args)
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    video = _check_output(pipe, args)
    if args.quantize:
        from diffadapt import quantized

        import warnings

        # LLM.int8 casts float32 activations to float16 by design: one notice per layer per step otherwise
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        try:
            quantized.quantize_pipeline(pipe, args.quantize)
        except ImportError as exc:
            raise CliError(f"--quantize {args.quantize}: {exc}") from None
    names = [f"adapter{i}" for i in range(len(adapters))]
    strengths = [strength for _, strength in adapters]
    for name, (path, _) in zip(names, adapters):
        files.load(pipe, path, name)  # read once, against this pipeline: every supported format
    t0 = time.perf_counter()
    if names:
        da.set_adapters(pipe, names, strengths)
        if args.merge and args.quantize:  # requantized with a report, or refused and kept live
            from diffadapt import quantized

            merge_line = quantized.merge_or_keep_live(pipe)
        elif args.merge:
            da.merge_adapters(pipe)
    switch_ms = (time.perf_counter() - t0) * 1e3
    if names and args.merge and args.quantize and merge_line:
        print(f"--merge: {merge_line}")
    kwargs = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    out = Path(args.output or ("diffadapt.webp" if video else "diffadapt.png"))
    if video:  # the first video, as an animated WebP / GIF at the pipeline's frame rate
        kwargs.update(num_frames=args.num_frames, output_type="np")
        frames = media.videos(pipe(**_accepted(pipe, kwargs)))[0]
        fps = args.fps or media.fps_of(pipe)
        media.save_animated(frames, out, fps)
        made = f"{len(frames)} frame{'s' * (len(frames) != 1)}, {frames[0].width}x{frames[0].height}, {fps:g} fps"
    else:
        image = pipe(**_accepted(pipe, kwargs)).images[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        made = f"{image.width}x{image.height}"
    used = ", ".join(f"{Path(p).name}@{s:g}" for p, s in adapters) or "none"
    print(f"wrote {out} ({made}); adapters: {used}; switch {switch_ms:.1f} ms")


def _short(value, limit: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_info(args) -> None:
    from diffadapt import files

    pipe = _load_pipeline(args.model, "cpu", "float32") if args.model else None
    info = files.describe(args.path, pipe, args.component)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"{info['path']}: {info['size_bytes'] / 1e6:.2f} MB, {files.KINDS[info['format']]}")
    for key, value in info["metadata"].items():
        print(f"  {key}: {_short(value)}")
    raw = info["format"] == "community" and info["fits"] is not True  # described from tensor names and shapes
    for name, comp in info["components"].items():
        config = "".join(f", {k} {_short(v, 40)}" for k, v in comp["config"].items()) if raw else ""
        print(f"  [{name}] {comp['method']} on {comp['class'] or '?'}: {comp['layers']} {'modules' if raw else 'layers'}, "
              f"{comp['parameters']:,} {'values' if raw else 'parameters'}{config}")
    if info["fits"] is not None:
        print(f"  fits {type(pipe).__name__} ({args.model}): {'yes' if info['fits'] else 'no'}")
    for note in info["notes"]:
        print(f"  note: {note}")


COMMUNITY = ("lycoris", "comfyui", "a1111", "forge", "kohya")


def cmd_convert(args) -> None:
    from diffadapt.checkpoint import write_peft_folder
    from diffadapt.pipeline import read_pipeline_adapter, write_pipeline_adapter, write_pipeline_folder

    # the base pipeline resolves LyCORIS names and gives the weights .diff / LoRA exports need
    pipe = _load_pipeline(args.model, "cpu", "float32") if args.model else None
    adapter = read_pipeline_adapter(args.src, args.component, target=pipe)
    if adapter.unplaced is not None:  # a PEFT folder: say which component it is (default: the denoiser)
        from diffadapt.artifact import components, denoiser

        adapter = adapter.placed(args.component or (pipe is not None and denoiser(components(pipe))) or "unet")
    to = args.to or ("diffadapt" if Path(args.dst).suffix == ".safetensors" or len(adapter.components) > 1 else "peft")
    dst = Path(args.dst)
    if to in COMMUNITY:  # one format (LyCORIS keys); --to picks the forms that reader applies
        from diffadapt.pipeline import export_lycoris

        report = export_lycoris(
            adapter, dst, pipe, rotations=args.rotations, lora_rank=args.lora_rank, unet_names=args.unet_names,
            consumer=None if to == "lycoris" else to,
        )
        kinds = ", ".join(f"{n} as {k}" for k, n in report["written_as"].items())
        lossy = f"; low-rank error up to {report['max_relative_error']:.2e}" if report["max_relative_error"] else ""
        print(f"wrote {dst} ({to}: {kinds}{lossy})")
        for reader, verdict in report.get("consumers", {}).items():
            print(f"  {reader}: {verdict}")
        for note in report["notes"]:
            print(f"  note: {note}")
        return
    if to == "peft":
        parts = adapter.components
        if len(parts) == 1:
            ((_, (config, tensors)),) = parts.items()
            write_peft_folder(dst, config, tensors, adapter.metadata.get("base_model"))
        else:  # one PEFT folder per component, written atomically with its manifest
            write_pipeline_folder(adapter, dst)
    else:
        write_pipeline_adapter(adapter, dst)
    print(f"wrote {dst} ({to}: {', '.join(adapter.components)})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffadapt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image (or a video) with adapters")
    gen.add_argument("--model", help="pipeline folder or hub id (default: the embedded model)")
    gen.add_argument("--adapter", action="append", type=_parse_adapter, metavar="PATH[:STRENGTH]",
                     help="repeatable: a diffadapt file/folder, a PEFT folder or a LyCORIS/kohya/ComfyUI OFT/BOFT file")
    gen.add_argument("--merge", action="store_true",
                     help="merge the adapters into the weights first (with --quantize: requantized, the error printed; "
                     "refused merges keep the adapters live, with one line saying why)")
    gen.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                     help="quantize the denoiser's Linear layers with bitsandbytes after loading (needs diffadapt[quantized])")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--seed", type=_integer(0, 2**64 - 1, "a whole number"), default=0)
    gen.add_argument("--steps", type=_integer(1, what="a whole number"), default=25)
    gen.add_argument("--guidance", type=_finite, default=7.5)
    gen.add_argument("--height", type=_side, default=None, help="pixels, a multiple of 8")
    gen.add_argument("--width", type=_side, default=None, help="pixels, a multiple of 8")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--num_frames", type=_integer(1, what="a whole number"), default=None,
                     help="video pipelines: frames to make (default: the pipeline's own; Wan: 81, and 4k+1 frames)")
    gen.add_argument("--fps", type=_positive, default=None,
                     help="video pipelines: frame rate of the written file (default: the pipeline's, else 16)")
    gen.add_argument("-o", "--output", default=None,
                     help="image file (default diffadapt.png); a video pipeline writes an animated .webp "
                     "(lossless, default diffadapt.webp) or .gif (256 colours)")
    gen.set_defaults(run=cmd_generate)

    info = sub.add_parser("info", help="describe an adapter file or folder (any supported format)")
    info.add_argument("path")
    info.add_argument("--model", default=None,
                      help="base pipeline: check the adapter fits it, resolve a LyCORIS/kohya/ComfyUI file's layer names")
    info.add_argument("--component", default=None, help="component of a PEFT folder or of lycoris_ keys")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    conv = sub.add_parser("convert", help="PEFT folder / diffadapt file / LyCORIS-ComfyUI file, any direction")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["peft", "diffadapt", *COMMUNITY], default=None,
                      help="lycoris: forms every oft_blocks reader loads; comfyui / a1111 / forge / kohya: the forms "
                      "that program applies exactly (the file's header says which readers load it)")
    conv.add_argument("--component", default=None,
                      help="component of a PEFT folder (default: the --model pipeline's denoiser, else unet) or of lycoris_ keys")
    conv.add_argument("--model", default=None, help="base pipeline: needed to read LyCORIS files and for .diff/LoRA exports")
    conv.add_argument("--rotations", choices=["auto", "blocks", "diff"], default="auto",
                      help="lycoris/comfyui: OFT/BOFT as oft_blocks where exact (auto), only so (blocks), or as .diff")
    conv.add_argument("--lora-rank", dest="lora_rank", type=_integer(1, what="a whole number"), default=None,
                      help="lycoris/comfyui: write additive adapters as a rank-R LoRA (lossy, error reported)")
    conv.add_argument("--unet-names", dest="unet_names", choices=["auto", "ldm", "diffusers"], default="auto",
                      help="lycoris/comfyui: UNet key names (auto: ldm for SDXL as kohya writes them)")
    conv.set_defaults(run=cmd_convert)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    notices.quiet_import_notices()  # before diffusers is imported: optional packages' import notices
    try:
        args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for the user, never a traceback
        from diffadapt.checkpoint import CheckpointError
        from diffadapt.methods import AdapterConfigError

        known = (CliError, CheckpointError, AdapterConfigError, FileNotFoundError, ValueError, OSError)
        kind = "" if isinstance(exc, known) else f"{type(exc).__name__}: "
        message = " ".join(str(exc).split())
        print(f"diffadapt {args.command}: error: {kind}{message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
