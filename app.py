"""Gradio demo: one diffusers pipeline, any number of diffadapt adapters, switched per request.

    python app.py [--model PATH_OR_ID] [--adapters DIR_OR_FILES ...] [--host 127.0.0.1] [--port 7860]
                  [--device cpu] [--dtype float32] [--max-upload-mb 512]

The base pipeline is loaded once. Every request says which adapters it wants, with which
strengths and in which mode ("live": adapters run on the activations; "merged": baked into the
weights, bit-exactly undone on the next switch); ``DemoApp.generate`` applies that choice and
renders inside one lock, so concurrent users always get exactly what they asked for. Uploaded
adapters are checked (extension, size, readable diffadapt/PEFT file, fits this pipeline) before
they are used; ``load_adapter`` is atomic, so a refused file leaves the pipeline untouched.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

import diffadapt as da  # noqa: E402
from diffadapt.cli import describe  # noqa: E402

ADAPTER_MARKERS = ("diffadapt_adapter.json", "adapter_config.json")  # an adapter folder has one
MAX_SEED = 2**31 - 1


class AdapterError(ValueError):
    """An adapter that cannot be used (bad file, wrong architecture, too large, ...)."""


@dataclass
class AdapterInfo:
    name: str
    source: str  # path it was loaded from (or the uploaded file's original name)
    method: str
    parameters: int
    size_bytes: int
    trigger: str
    metadata: dict = field(default_factory=dict)


@dataclass
class GenerateRequest:
    prompt: str
    adapters: Sequence[tuple[str, float]] = ()  # activation order, (name, strength)
    negative_prompt: str = ""
    seed: Optional[int] = 0  # None: random
    steps: int = 25
    guidance: float = 7.5
    width: Optional[int] = None
    height: Optional[int] = None
    mode: str = "live"  # or "merged"
    side_by_side: bool = False  # also render the same seed without adapters


@dataclass
class GenerateResult:
    images: list  # PIL images: [with adapters] or [with adapters, without]
    captions: list[str]
    adapters: list[tuple[str, float]]
    mode: str
    seed: int
    switch_ms: float
    generation_s: float

    def summary(self) -> str:
        used = ", ".join(f"{n} @ {s:g}" for n, s in self.adapters) or "none (base model)"
        return (
            f"**Adapters used:** {used} · mode **{self.mode}** · seed {self.seed}  \n"
            f"switch {self.switch_ms:.1f} ms · generation {self.generation_s:.2f} s"
            + (" (both images)" if len(self.images) > 1 else "")
        )

    def as_dict(self) -> dict:
        return {
            "adapters": [[n, s] for n, s in self.adapters],
            "mode": self.mode,
            "seed": self.seed,
            "switch_ms": round(self.switch_ms, 3),
            "generation_s": round(self.generation_s, 3),
            "captions": self.captions,
        }


# -- pipeline and adapter files --------------------------------------------------------------------
def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype: str = "float32"):
    """``DiffusionPipeline.from_pretrained`` once; default: the model embedded in diffadapt."""
    from diffusers import DiffusionPipeline

    from diffadapt.defaults import default_model_path

    source = model or default_model_path()
    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ADAPTER_MARKERS)


def find_adapters(paths: Sequence[str]) -> list[Path]:
    """Adapter files/folders named directly, plus every ``.safetensors`` file and adapter folder
    inside a folder that is not an adapter itself."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise AdapterError(f"No adapter at {p}.")
        if p.is_file() or is_adapter_folder(p):
            found.append(p)
        else:
            found += [c for c in sorted(p.iterdir()) if (c.is_file() and c.suffix == ".safetensors") or is_adapter_folder(c)]
    return found


def _clean_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "adapter"


# -- the non-UI part: adapter registry + locked generation -----------------------------------------
class DemoApp:
    """One shared pipeline, its adapters, and ``generate(request)`` under a lock."""

    def __init__(self, pipe, max_upload_mb: float = 512.0, max_adapters: int = 8):
        self.pipe = pipe
        self.max_upload_mb = max_upload_mb
        self.max_adapters = max_adapters
        self.adapters: list[AdapterInfo] = []  # load order; never reordered (UI slots index it)
        self.lock = threading.RLock()
        params = inspect.signature(pipe.__call__).parameters
        self.accepts = set(params)
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        scale = getattr(pipe, "vae_scale_factor", 8)
        sample = getattr(getattr(self.denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        self.size_step = scale * (1 if getattr(pipe, "unet", None) is not None else 2)
        self.default_size = int(sample) * scale
        self.default_steps = params["num_inference_steps"].default if "num_inference_steps" in params else 25
        self.default_guidance = params["guidance_scale"].default if "guidance_scale" in params else 7.5

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def _unique(self, stem: str) -> str:
        name, i = _clean_name(stem), 2
        base = name
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        return name

    def add_adapter(self, path, name: Optional[str] = None, shown: Optional[str] = None) -> AdapterInfo:
        """Read, describe and load one adapter (file or folder). AdapterError if it is unusable;
        the pipeline is then unchanged (load_adapter checks everything before it changes a thing).
        ``shown``: the name used in messages instead of the path (uploads: the original file name)."""
        path = Path(path)
        shown = shown or str(path)

        def why(exc):  # one line, with no server-side paths for uploads
            return _one_line(exc).replace(str(path), shown).replace(str(path.parent) + os.sep, "")

        if len(self.adapters) >= self.max_adapters:
            raise AdapterError(f"This demo holds at most {self.max_adapters} adapters.")
        try:
            info = describe(str(path))
        except Exception as exc:  # CheckpointError, bad JSON, unknown method, ...
            raise AdapterError(f"{shown} is not a readable adapter: {why(exc)}") from None
        meta = info["metadata"]
        with self.lock:
            name = self._unique(name or (path.stem if path.is_file() else path.name))
            if self.adapters:  # load into unmerged weights; generate() re-applies every request's choice
                da.unmerge_adapters(self.pipe)
            try:
                da.load_adapter(self.pipe, path, name)
            except Exception as exc:
                if self.adapters and name in da.list_adapters(self.pipe):  # never expected: load is atomic
                    da.delete_adapter(self.pipe, name)
                raise AdapterError(f"{shown} does not fit this pipeline: {why(exc)}") from None
            entry = AdapterInfo(
                name=name,
                source=shown,
                method=str(meta.get("method") or next(iter(info["components"].values()))["method"]),
                parameters=sum(c["parameters"] for c in info["components"].values()),
                size_bytes=info["size_bytes"],
                trigger=str(meta.get("instance_prompt") or meta.get("trigger") or meta.get("trigger_word") or ""),
                metadata=meta,
            )
            self.adapters.append(entry)
        return entry

    def add_upload(self, path, original_name: Optional[str] = None) -> AdapterInfo:
        """An uploaded file: ``.safetensors`` only, at most ``max_upload_mb``, then ``add_adapter``."""
        path = Path(path)
        shown = original_name or path.name
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise AdapterError(f"{shown}: only .safetensors adapter files can be uploaded.")
        size = path.stat().st_size
        if size > self.max_upload_mb * 2**20:
            raise AdapterError(f"{shown}: {size / 2**20:.1f} MB is over the {self.max_upload_mb:g} MB upload limit.")
        return self.add_adapter(path, Path(shown).stem, shown=shown)

    def _apply(self, adapters: list[tuple[str, float]], merged: bool) -> None:
        """Make exactly ``adapters`` active (in order) in ``merged`` or live mode. Under the lock."""
        if not self.adapters:
            return
        if not merged:
            da.unmerge_adapters(self.pipe)  # a no-op when nothing is merged
        da.set_adapters(self.pipe, [n for n, _ in adapters], [s for _, s in adapters])  # merged: a merge-switch
        if merged:
            da.merge_adapters(self.pipe)  # a no-op when the merge-switch already merged them

    def _render(self, req: GenerateRequest, seed: int, progress, done: int, total: int):
        kwargs = dict(prompt=req.prompt, num_inference_steps=int(req.steps), generator=torch.Generator("cpu").manual_seed(seed))
        optional = dict(
            negative_prompt=req.negative_prompt or None,
            guidance_scale=float(req.guidance),
            width=int(req.width) if req.width else None,
            height=int(req.height) if req.height else None,
        )
        kwargs.update({k: v for k, v in optional.items() if v is not None and k in self.accepts})
        if progress is not None and "callback_on_step_end" in self.accepts:

            def on_step(pipe, step, timestep, callback_kwargs):
                progress(done + step + 1, total)
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step
        with torch.no_grad():
            return self.pipe(**kwargs).images[0]

    def check(self, req: GenerateRequest) -> list[tuple[str, float]]:
        if req.mode not in ("live", "merged"):
            raise ValueError(f"mode must be 'live' or 'merged', not {req.mode!r}.")
        if not str(req.prompt).strip():
            raise ValueError("Write a prompt first.")
        if not 1 <= int(req.steps) <= 200:
            raise ValueError("Steps must be between 1 and 200.")
        for side in (req.width, req.height):
            if side and (int(side) % self.size_step or not 0 < int(side) <= 4096):
                raise ValueError(f"Width and height must be multiples of {self.size_step} (got {side}).")
        adapters = [(str(n), float(s)) for n, s in req.adapters]
        unknown = [n for n, _ in adapters if n not in self.names]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {self.names}.")
        if len({n for n, _ in adapters}) != len(adapters):
            raise ValueError("An adapter can be chosen once per request.")
        return adapters

    def generate(self, req: GenerateRequest, progress: Optional[Callable[[int, int], None]] = None) -> GenerateResult:
        """Render ``req`` with exactly its adapters/strengths/mode (and, side by side, without)."""
        adapters = self.check(req)
        seed = random.randint(0, MAX_SEED) if req.seed is None else int(req.seed)
        total = int(req.steps) * (2 if req.side_by_side else 1)
        with self.lock:
            t0 = time.perf_counter()
            self._apply(adapters, req.mode == "merged")
            switch_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            images = [self._render(req, seed, progress, 0, total)]
            if req.side_by_side:
                self._apply([], req.mode == "merged")
                images.append(self._render(req, seed, progress, int(req.steps), total))
            generation_s = time.perf_counter() - t0
        used = ", ".join(f"{n} @ {s:g}" for n, s in adapters) or "no adapters"
        captions = [f"with {used}"] + (["without adapters"] if req.side_by_side else [])
        return GenerateResult(images, captions, adapters, req.mode, seed, switch_ms, generation_s)

    def table(self) -> str:
        if not self.adapters:
            return "_No adapters loaded yet: upload a `.safetensors` adapter file below._"
        rows = ["| adapter | method | trainable parameters | file size | trigger / instance prompt | base model |", "|---|---|---|---|---|---|"]
        for a in self.adapters:
            trigger = f"`{a.trigger}`" if a.trigger else "—"
            rows.append(
                f"| {a.name} | {a.method} | {a.parameters:,} | {_size(a.size_bytes)} | {trigger} | {a.metadata.get('base_model', '—')} |"
            )
        return "\n".join(rows)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def create_app(model=None, adapters: Sequence[str] = (), device="cpu", dtype="float32", **kwargs) -> DemoApp:
    app = DemoApp(load_pipeline(model, device, dtype), **kwargs)
    for path in find_adapters(adapters):
        app.add_adapter(path)
    return app


# -- the UI ----------------------------------------------------------------------------------------
def build_ui(app: DemoApp):
    import gradio as gr

    n_slots = app.max_adapters
    size_ok = {"width", "height"} <= app.accepts

    with gr.Blocks(title="diffadapt demo") as demo:
        gr.Markdown(f"## diffadapt demo · `{type(app.pipe).__name__}`\nAdapters switch per request; the base model is loaded once.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", visible="negative_prompt" in app.accepts, elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(label="random seed", value=False, elem_id="random_seed")
                steps = gr.Slider(1, 100, value=app.default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, value=app.default_guidance, step=0.5, label="Guidance",
                                     visible="guidance_scale" in app.accepts, elem_id="guidance")
                with gr.Row(visible=size_ok):
                    lo, hi = app.size_step * max(1, app.default_size // app.size_step // 4), app.default_size * 2
                    width = gr.Slider(lo, hi, value=app.default_size, step=app.size_step, label="Width", elem_id="width")
                    height = gr.Slider(lo, hi, value=app.default_size, step=app.size_step, label="Height", elem_id="height")
                with gr.Row():
                    mode = gr.Radio(["live", "merged"], value="live", label="Adapter mode", elem_id="mode")
                    side = gr.Checkbox(label="side by side: same seed without adapters", elem_id="side")
                gr.Markdown("### Active adapters and strengths")
                rows, uses, strengths = [], [], []  # one slot per adapter, in load order
                for i in range(n_slots):
                    name = app.names[i] if i < len(app.adapters) else ""
                    with gr.Row(visible=bool(name)) as row:
                        uses.append(gr.Checkbox(label=name, value=False, elem_id=f"use_{i}"))
                        strengths.append(gr.Slider(0, 2, value=1.0, step=0.05, label=f"{name} strength", elem_id=f"strength_{i}"))
                    rows.append(row)
                upload = gr.File(label="Add an adapter (.safetensors)", file_types=[".safetensors"], height=110, elem_id="upload")
                upload_status = gr.Markdown(elem_id="upload_status")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Result", columns=2, format="png", preview=False, object_fit="contain",
                                     height=420, elem_id="result")
                info = gr.Markdown(elem_id="info")
                with gr.Accordion("details (JSON)", open=False):
                    details = gr.JSON(elem_id="details")
        gr.Markdown("### Loaded adapters")
        table = gr.Markdown(app.table(), elem_id="adapters_table")

        def on_generate(progress=gr.Progress(), *values):
            p, neg, s, rnd, st, g, w, h, md, sbs = values[:10]
            use, strength = values[10 : 10 + n_slots], values[10 + n_slots :]
            chosen = [(a.name, float(strength[i])) for i, a in enumerate(app.adapters[:n_slots]) if use[i]]
            req = GenerateRequest(p, chosen, neg or "", None if rnd else int(s or 0), int(st), float(g),
                                  int(w) if size_ok else None, int(h) if size_ok else None, md, bool(sbs))
            try:
                res = app.generate(req, lambda i, n: progress((i, n), desc="denoising"))
            except Exception as exc:  # a message in the page, never a crash
                raise gr.Error(_one_line(exc)) from None
            return list(zip(res.images, res.captions)), res.summary(), res.as_dict()

        def slot_updates():  # rows, checkbox labels, slider labels
            names = app.names + [""] * (n_slots - len(app.adapters))
            return ([gr.update(visible=bool(n)) for n in names] + [gr.update(label=n) for n in names]
                    + [gr.update(label=f"{n} strength") for n in names])

        def on_upload(file):
            if file is None:
                return ["", app.table(), *slot_updates()]
            path = Path(file if isinstance(file, str) else file.name)  # gradio keeps the original name
            try:
                a = app.add_upload(path, path.name)
                msg = f"Loaded **{a.name}** ({a.method}, {a.parameters:,} parameters)."
            except Exception as exc:  # AdapterError (or anything else): a message, never a crash
                gr.Warning(_one_line(exc))
                msg = f"**Upload refused:** {_one_line(exc)}"
            return [msg, app.table(), *slot_updates()]

        controls = [prompt, negative, seed, random_seed, steps, guidance, width, height, mode, side, *uses, *strengths]
        button.click(on_generate, controls, [gallery, info, details], api_name="generate", concurrency_limit=1,
                     concurrency_id="generate")
        prompt.submit(on_generate, controls, [gallery, info, details], api_name=False, concurrency_limit=1,
                      concurrency_id="generate")
        upload.upload(on_upload, upload, [upload_status, table, *rows, *uses, *strengths], api_name="upload_adapter")
        demo.load(lambda: [app.table(), *slot_updates()], None, [table, *rows, *uses, *strengths], api_name=False)
    demo.queue(default_concurrency_limit=1)
    return demo


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Gradio demo of diffadapt adapters on a diffusers pipeline.")
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: the embedded model)")
    parser.add_argument("--adapters", nargs="*", default=[], help="adapter files/folders, or folders holding them")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-upload-mb", type=float, default=512.0)
    parser.add_argument("--max-adapters", type=int, default=8, help="adapter slots in the page")
    args = parser.parse_args(argv)
    try:
        app = create_app(args.model, args.adapters, args.device, args.dtype,
                         max_upload_mb=args.max_upload_mb, max_adapters=args.max_adapters)
    except (AdapterError, OSError, ValueError) as exc:
        print(f"app.py: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(f"loaded {type(app.pipe).__name__}; adapters: {', '.join(app.names) or 'none'}")
    build_ui(app).launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb:g}mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
