"""``diffadapt`` command line: generate with adapters, inspect adapter files, convert formats.

    diffadapt generate --adapter subject/:0.8 --prompt "a photo of sks hexagon" -o out.png
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
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


class CliError(Exception):
    pass


def _parse_adapter(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:STRENGTH``."""
    path, sep, strength = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
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


def cmd_generate(args) -> None:
    import torch

    import diffadapt as da

    adapters = [_parse_adapter(spec) for spec in args.adapter or []]
    for path, _ in adapters:  # fail fast, before the model loads
        if not Path(path).exists():
            raise CliError(f"no adapter at {path}")
        da.read_pipeline_adapter(path)
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    names = [f"adapter{i}" for i in range(len(adapters))]
    strengths = [strength for _, strength in adapters]
    for name, (path, _) in zip(names, adapters):
        da.load_adapter(pipe, path, name)
    t0 = time.perf_counter()
    if names:
        da.set_adapters(pipe, names, strengths)
        if args.merge:
            da.merge_adapters(pipe)
    switch_ms = (time.perf_counter() - t0) * 1e3
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
    image = pipe(**kwargs).images[0]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    used = ", ".join(f"{Path(p).name}@{s:g}" for p, s in adapters) or "none"
    print(f"wrote {out} ({image.width}x{image.height}); adapters: {used}; switch {switch_ms:.1f} ms")


def describe(path: str) -> dict:
    """What ``diffadapt info`` prints: method, components, parameters, size, metadata."""
    from diffadapt.pipeline import read_pipeline_adapter

    adapter = read_pipeline_adapter(path)
    files = [Path(path)] if Path(path).is_file() else [p for p in Path(path).rglob("*") if p.is_file()]
    return {
        "path": str(path),
        "size_bytes": sum(p.stat().st_size for p in files),
        "metadata": adapter.metadata,
        "components": {
            (n or "model"): {
                "class": adapter.classes.get(n),
                "method": config.method,
                "layers": len({k.rsplit(".", 1)[0] for k in tensors if k.startswith("base_model.model.")}),
                "parameters": sum(v.numel() for v in tensors.values()),
                "config": config.to_dict(),
            }
            for n, (config, tensors) in adapter.components.items()
        },
    }


def cmd_info(args) -> None:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"{info['path']}: {info['size_bytes'] / 1e6:.2f} MB")
    for key, value in info["metadata"].items():
        print(f"  {key}: {value}")
    for name, comp in info["components"].items():
        print(f"  [{name}] {comp['method']} on {comp['class'] or '?'}: {comp['layers']} layers, {comp['parameters']:,} parameters")


def cmd_convert(args) -> None:
    from diffadapt.checkpoint import write_peft_folder
    from diffadapt.pipeline import read_pipeline_adapter, write_pipeline_adapter

    # the base pipeline resolves LyCORIS names and gives the weights .diff / LoRA exports need
    pipe = _load_pipeline(args.model, "cpu", "float32") if args.model else None
    adapter = read_pipeline_adapter(args.src, args.component, target=pipe)
    if "" in adapter.components:  # a PEFT folder: say which component it is
        adapter.components[args.component or "unet"] = adapter.components.pop("")
        adapter.classes[args.component or "unet"] = adapter.classes.pop("")
    to = args.to or ("diffadapt" if Path(args.dst).suffix == ".safetensors" or len(adapter.components) > 1 else "peft")
    dst = Path(args.dst)
    if to in ("lycoris", "comfyui"):  # one format: LyCORIS, ComfyUI, A1111/Forge and kohya read it
        from diffadapt.pipeline import export_lycoris

        report = export_lycoris(
            adapter, dst, pipe, rotations=args.rotations, lora_rank=args.lora_rank, unet_names=args.unet_names
        )
        kinds = ", ".join(f"{n} as {k}" for k, n in report["written_as"].items())
        lossy = f"; low-rank error up to {report['max_relative_error']:.2e}" if report["max_relative_error"] else ""
        print(f"wrote {dst} ({to}: {kinds}{lossy})")
        for note in report["notes"]:
            print(f"  note: {note}")
        return
    if to == "peft":
        parts = adapter.components
        if len(parts) == 1:
            ((_, (config, tensors)),) = parts.items()
            write_peft_folder(dst, config, tensors, adapter.metadata.get("base_model"))
        else:
            for n, (config, tensors) in parts.items():
                write_peft_folder(dst / n, config, tensors, adapter.metadata.get("base_model"))
    else:
        write_pipeline_adapter(adapter, dst)
    print(f"wrote {dst} ({to}: {', '.join(adapter.components)})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffadapt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image with adapters")
    gen.add_argument("--model", help="pipeline folder or hub id (default: the embedded model)")
    gen.add_argument("--adapter", action="append", metavar="PATH[:STRENGTH]", help="repeatable")
    gen.add_argument("--merge", action="store_true", help="merge the adapters into the weights first")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("-o", "--output", default="diffadapt.png")
    gen.set_defaults(run=cmd_generate)

    info = sub.add_parser("info", help="describe an adapter file or folder")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    conv = sub.add_parser("convert", help="PEFT folder / diffadapt file / LyCORIS-ComfyUI file, any direction")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["peft", "diffadapt", "lycoris", "comfyui"], default=None)
    conv.add_argument("--component", default=None, help="component of a PEFT folder (default unet) or of lycoris_ keys")
    conv.add_argument("--model", default=None, help="base pipeline: needed to read LyCORIS files and for .diff/LoRA exports")
    conv.add_argument("--rotations", choices=["auto", "blocks", "diff"], default="auto",
                      help="lycoris/comfyui: OFT/BOFT as oft_blocks where exact (auto), only so (blocks), or as .diff")
    conv.add_argument("--lora-rank", dest="lora_rank", type=int, default=None,
                      help="lycoris/comfyui: write additive adapters as a rank-R LoRA (lossy, error reported)")
    conv.add_argument("--unet-names", dest="unet_names", choices=["auto", "ldm", "diffusers"], default="auto",
                      help="lycoris/comfyui: UNet key names (auto: ldm for SDXL as kohya writes them)")
    conv.set_defaults(run=cmd_convert)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
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
