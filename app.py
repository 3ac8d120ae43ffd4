"""Gradio demo: one diffusers pipeline, any number of diffadapt adapters, switched per request.

    python app.py [--model PATH_OR_ID] [--adapters DIR_OR_FILES ...] [--host 127.0.0.1] [--port 7860]
                  [--device cpu] [--dtype float32] [--max-upload-mb 512] [--max-adapters 8]
                  [--max-uploads 32] [--session-minutes 60] [--max-grid-cells 16]

The base pipeline is loaded once. Every request says which adapters it wants, with which
strengths and in which mode ("live": adapters run on the activations; "merged": baked into the
weights, bit-exactly undone on the next switch); ``DemoApp.generate`` applies that choice and
renders inside one lock, so concurrent users always get exactly what they asked for.

Adapters given at start (``--adapters``) are shared by every visitor. An uploaded adapter belongs
to the browser session that uploaded it: only that session sees and uses it, it takes one of that
page's ``--max-adapters`` slots (the page says how many are left), and it is deleted when the
session ends (tab closed or reloaded) or after ``--session-minutes`` without a request.
``--max-uploads`` bounds the uploads held for all sessions together (memory). Uploads are
checked (extension, size, a readable diffadapt / PEFT / LyCORIS-kohya-ComfyUI file, fits this
pipeline) before they are used; loading is atomic, so a refused file leaves the pipeline and
every other session untouched. Everything a file brings (names, metadata, config values, the
text of errors about it) is escaped before it reaches the page.

The page opens ready to use: steps and guidance come from the model folder's card
(``model_defaults``), the shared adapters are checked and the prompt holds their trigger prompts
(from each file's metadata; checking or uploading an adapter adds its trigger while the prompt is
still the prefilled one), example prompts the model draws are one click away, and "Make grid"
renders the checked adapters (rows) x a list of strengths (columns) with one seed for every cell,
each cell exactly what ``generate`` gives for that adapter alone at that strength
(``--max-grid-cells`` bounds it).

A video pipeline (Wan, ...: its ``__call__`` takes ``num_frames``) makes ``--num-frames`` frames
(default: the pipeline's own) and the page shows each video as an animated lossless WebP
(``diffadapt.media``: Pillow only, no ffmpeg, which ``gr.Video`` would need); the strength grid
shows each cell's first frame, and the page says so.
"""

from __future__ import annotations

import argparse
import html
import inspect
import itertools
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

import diffadapt as da  # noqa: E402
from diffadapt import files  # noqa: E402
from diffadapt import media  # noqa: E402
from diffadapt import notices  # noqa: E402
from diffadapt import quantized  # noqa: E402

ADAPTER_MARKERS = ("diffadapt_adapter.json", "adapter_config.json")  # an adapter folder has one
MAX_SEED = 2**31 - 1
MEDIA_KEPT = 64  # animated results kept on disk for the page (gradio copies each into its cache)


class AdapterError(ValueError):
    """An adapter that cannot be used (bad file, wrong architecture, too large, ...)."""


@dataclass
class AdapterInfo:
    name: str  # what the page shows and requests name; unique within what one session sees
    source: str  # path it was loaded from (or the uploaded file's original name)
    method: str
    parameters: int
    size_bytes: int
    trigger: str
    metadata: dict = field(default_factory=dict)
    key: str = ""  # its name inside the pipeline (uploads: unique over all sessions); default: name
    owner: Optional[str] = None  # the session that uploaded it; None: loaded at start, shared


@dataclass
class _Session:
    uploads: list = field(default_factory=list)  # AdapterInfo, in upload order
    last_seen: float = field(default_factory=time.monotonic)


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
    num_frames: Optional[int] = None  # video pipelines: None = the app's default (--num-frames, else the pipeline's)


@dataclass
class GridResult:
    """An adapter x strength grid: ``cells[r][c]`` is adapter ``rows[r]`` alone at ``strengths[c]``."""

    image: object  # PIL: the labelled grid
    cells: list  # rows x columns of PIL images
    rows: list[str]
    strengths: list[float]
    mode: str
    seed: int
    origin: tuple[int, int]  # top-left pixel of cell (0, 0); cell (r, c) starts at origin + (c*w, r*h)
    cell_size: tuple[int, int]
    generation_s: float
    merge: str = ""  # a quantized base in merged mode: the cells' requantization reports / refusals
    note: str = ""  # a video pipeline: what a cell shows of its video

    def cell_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        (x, y), (w, h) = self.origin, self.cell_size
        return (x + c * w, y + r * h, x + (c + 1) * w, y + (r + 1) * h)

    @property
    def caption(self) -> str:
        return (f"rows: {', '.join(self.rows)} · columns: strength {', '.join(f'{s:g}' for s in self.strengths)}"
                f" · seed {self.seed}")

    def summary(self) -> str:
        rows = ", ".join(_md(n) for n in self.rows)
        return (f"**Grid:** {len(self.rows)} adapter(s) x {len(self.strengths)} strength(s) "
                f"({', '.join(f'{s:g}' for s in self.strengths)}) · rows {rows} · mode **{self.mode}** · "
                f"seed {self.seed} (every cell)  \ngeneration {self.generation_s:.2f} s for "
                f"{len(self.rows) * len(self.strengths)} {'videos' if self.note else 'images'}"
                + (f"  \n{self.note}" if self.note else "")
                + (f"  \n{_md(self.merge, 600)}" if self.merge else ""))

    def as_dict(self) -> dict:
        return {
            "grid": {"rows": list(self.rows), "strengths": list(self.strengths), "origin": list(self.origin),
                     "cell_size": list(self.cell_size), "size": list(self.image.size)},
            "mode": self.mode,
            "seed": self.seed,
            "generation_s": round(self.generation_s, 3),
            **({"merge": self.merge} if self.merge else {}),
        }


def parse_strengths(text) -> list[float]:
    """``"0, 0.5, 1"`` (commas, semicolons or spaces between) -> [0.0, 0.5, 1.0]; ValueError naming
    the field otherwise."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p for p in re.split(r"[,;\s]+", str(text or "").strip()) if p]
    if not parts:
        raise ValueError("Grid strengths: give at least one number, e.g. 0, 0.5, 1.")
    values = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise ValueError(f"Grid strengths: {str(part)[:40]!r} is not a number; give a list such as 0, 0.5, 1.") from None
        if not math.isfinite(value):
            raise ValueError(f"Grid strengths must be finite numbers (got {str(part)[:40]!r}).")
        values.append(value)
    return values


def compose_grid(cells: Sequence[Sequence], rows: Sequence[str], strengths: Sequence[float]):
    """The labelled grid image of ``cells`` (rows x columns, all one size): strengths across the
    top, adapter names down the left. Returns (image, origin of cell (0, 0), cell size)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = cells[0][0].size
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text):
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    rows = [n if len(n) <= 24 else n[:22] + ".." for n in rows]
    cols = [f"{s:g}" for s in strengths]
    pad = 4
    left = max(text_size(n)[0] for n in rows) + 2 * pad
    top = max(text_size(c)[1] for c in cols + ["strength"]) + 2 * pad
    grid = Image.new("RGB", (left + w * len(cols), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((max(pad, left - pad - text_size("strength")[0]), pad), "strength", fill="gray", font=font)
    for c, label in enumerate(cols):
        tw, _ = text_size(label)
        draw.text((left + c * w + max(0, (w - tw) // 2), pad), label, fill="black", font=font)
    for r, label in enumerate(rows):
        _, th = text_size(label)
        draw.text((pad, top + r * h + max(0, (h - th) // 2)), label, fill="black", font=font)
        for c, cell in enumerate(cells[r]):
            grid.paste(cell.convert("RGB"), (left + c * w, top + r * h))
    return grid, (left, top), (w, h)


@dataclass
class GenerateResult:
    images: list  # PIL images: [with adapters] or [with adapters, without]
    captions: list[str]
    adapters: list[tuple[str, float]]
    mode: str
    seed: int
    switch_ms: float
    generation_s: float
    merge: str = ""  # a quantized base in merged mode: the requantization report, or why it stayed live
    videos: list = field(default_factory=list)  # a video pipeline: each result's PIL frames (``images``: first frames)
    fps: float = 0.0  # a video pipeline: the frame rate the animated files play at
    media: list = field(default_factory=list)  # what the page shows: the images, or each video's animated file

    def summary(self) -> str:
        used = ", ".join(f"{_md(n)} @ {s:g}" for n, s in self.adapters) or "none (base model)"
        n = len(self.videos[0]) if self.videos else 0
        video = f" · video: {n} frame{'s' * (n != 1)} at {self.fps:g} fps" if self.videos else ""
        return (
            f"**Adapters used:** {used} · mode **{self.mode}** · seed {self.seed}{video}  \n"
            f"switch {self.switch_ms:.1f} ms · generation {self.generation_s:.2f} s"
            + ((" (both videos)" if self.videos else " (both images)") if len(self.images) > 1 else "")
            + (f"  \n{_md(self.merge, 600)}" if self.merge else "")
        )

    def as_dict(self) -> dict:
        return {
            "adapters": [[n, s] for n, s in self.adapters],
            "mode": self.mode,
            "seed": self.seed,
            "switch_ms": round(self.switch_ms, 3),
            "generation_s": round(self.generation_s, 3),
            "captions": self.captions,
            **({"video": {"frames": len(self.videos[0]), "fps": self.fps}} if self.videos else {}),
            **({"merge": self.merge} if self.merge else {}),
        }


# -- pipeline and adapter files --------------------------------------------------------------------
def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                  quantize: Optional[str] = None):
    """``DiffusionPipeline.from_pretrained`` once; default: the model embedded in diffadapt.
    ``quantize`` ("nf4", "fp4", "int8"): the denoiser's Linear layers quantized with bitsandbytes
    after loading (``diffadapt.quantized.quantize_pipeline``)."""
    from diffusers import DiffusionPipeline

    from diffadapt.defaults import default_model_path

    source = model or default_model_path()
    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if quantize:
        from diffadapt import quantized

        quantized.quantize_pipeline(pipe, quantize)
    return pipe


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


TRIGGER_KEYS = ("instance_prompt", "trigger", "trigger_word", "trigger_words", "trigger_phrase",
                "modelspec.trigger_phrase", "activation_text")  # adapter metadata, first found wins


def trigger_of(metadata: dict) -> str:
    """The trigger / instance prompt an adapter file's metadata names (diffadapt's DreamBooth
    script writes ``instance_prompt``; kohya's sd-scripts ``modelspec.trigger_phrase``), or ""."""
    for key in TRIGGER_KEYS:
        value = metadata.get(key)
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        text = " ".join(str(value).split()) if value is not None else ""
        if text:
            return text[:500]
    return ""


def _clean_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "adapter"


# -- what the model folder says about itself --------------------------------------------------------
@dataclass
class ModelDefaults:
    """Steps, guidance and example prompts the page opens with, and where each came from."""

    steps: int
    guidance: float
    examples: list[str] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # "steps" / "guidance" -> "model card" | "pipeline signature" | ...


_RANGE_STEPS = re.compile(r"(\d{1,3})\s*(?:[\u2013\u2014-]|to)\s*(\d{1,3})\s+(?:[A-Za-z+]+\s+)?steps\b", re.I)
_CODE_STEPS = re.compile(r"num_inference_steps\s*[=:]\s*(\d{1,3})\b")
_CODE_GUIDANCE = re.compile(r"guidance_scale\s*[=:]\s*(\d+(?:\.\d+)?)")
_PROSE_GUIDANCE = re.compile(r"\b(?:guidance(?: scale)?|cfg(?: scale)?)\b[^.\d\n]{0,30}?\(?(\d+(?:\.\d+)?)\b", re.I)
_CODE_PROMPT = re.compile(r"\bpipe(?:line)?\(\s*(?:prompt\s*=\s*)?\"([^\"\n]{3,200})\"")


def model_card(source) -> str:
    """The model card (README.md) of a pipeline folder, or of a hub id already in the local
    cache (no download); "" if there is none."""
    if not source:
        return ""
    path = Path(str(source)) / "README.md"
    if not path.is_file() and not Path(str(source)).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(source), "README.md")
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # not a hub id, no hub library, ...: no card
            return ""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[:200_000] if path.is_file() else ""
    except OSError:
        return ""


def _front_matter(card: str) -> dict:
    if not card.startswith("---"):
        return {}
    end = card.find("\n---", 3)
    try:
        import yaml

        data = yaml.safe_load(card[3:end]) if end > 0 else None
    except Exception:  # a broken header: as if there were none
        return {}
    return data if isinstance(data, dict) else {}


def _steps_ok(value) -> Optional[int]:
    return int(float(value)) if _whole(value) and 1 <= float(value) <= 200 else None


def _guidance_ok(value) -> Optional[float]:
    return float(value) if _finite(value) and 0 <= float(value) <= 50 else None


def model_defaults(source, signature_steps=None, signature_guidance=None, embedded: Optional[bool] = None) -> ModelDefaults:
    """What the page opens with, read from the pipeline folder's model card: the front matter's
    ``inference: parameters: {num_inference_steps, guidance_scale}`` and ``widget: [{text}]`` (the
    Hub's fields), else the card's text ("20-25 steps": the upper end; ``num_inference_steps=25``
    and ``pipe("...")`` in its code; "guidance (7.5)"). What the card does not say comes from the
    pipeline's ``__call__`` defaults (``signature_*``), else 25 steps and guidance 7.5. The
    embedded default model adds prompts it draws well (``diffadapt.world``)."""
    card = model_card(source)
    meta = _front_matter(card)
    params = meta.get("inference", {}) if isinstance(meta.get("inference"), dict) else {}
    params = params.get("parameters", {}) if isinstance(params.get("parameters"), dict) else {}
    text = card[card.find("\n---", 3) + 4:] if meta else card
    steps = guidance = None
    sources = {}
    if _steps_ok(params.get("num_inference_steps")):
        steps, sources["steps"] = _steps_ok(params["num_inference_steps"]), "model card (inference.parameters)"
    else:
        for pattern, pick in ((_RANGE_STEPS, lambda m: max(int(m[1]), int(m[2]))), (_CODE_STEPS, lambda m: int(m[1]))):
            found = [pick(m) for m in pattern.finditer(text) if _steps_ok(pick(m))]
            if found:
                steps, sources["steps"] = found[0], "model card"
                break
    if _guidance_ok(params.get("guidance_scale")) is not None:
        guidance, sources["guidance"] = _guidance_ok(params["guidance_scale"]), "model card (inference.parameters)"
    else:
        for pattern in (_CODE_GUIDANCE, _PROSE_GUIDANCE):
            found = [float(m[1]) for m in pattern.finditer(text) if _guidance_ok(m[1]) is not None]
            if found:
                guidance, sources["guidance"] = found[0], "model card"
                break
    if steps is None:
        steps = _steps_ok(signature_steps) or 25
        sources["steps"] = "pipeline signature" if _steps_ok(signature_steps) else "fallback"
    if guidance is None:
        guidance = _guidance_ok(signature_guidance)
        sources["guidance"] = "pipeline signature" if guidance is not None else "fallback"
        guidance = 7.5 if guidance is None else guidance
    widget = meta.get("widget") if isinstance(meta.get("widget"), list) else []
    examples = [w.get("text") if isinstance(w, dict) else w for w in widget]
    examples += [m[1] for m in _CODE_PROMPT.finditer(text)]
    if embedded is None:
        from diffadapt.defaults import DEFAULT_MODEL

        try:
            embedded = bool(source) and Path(str(source)).resolve() == DEFAULT_MODEL
        except OSError:
            embedded = False
    if embedded:
        from diffadapt.embedded import world

        examples += list(world.UNRELATED_PROMPTS[:4])
    seen, clean = set(), []
    for e in examples:
        e = " ".join(str(e).split())[:300] if isinstance(e, str) else ""
        if e and e not in seen:
            seen.add(e)
            clean.append(e)
    return ModelDefaults(steps, guidance, clean[:8], sources)


# -- the non-UI part: adapter registry + locked generation -----------------------------------------
class DemoApp:
    """One shared pipeline, its adapters, and ``generate(request)`` under a lock.

    ``adapters`` are the shared ones (loaded at start); each session's uploads are kept apart in
    ``sessions`` and seen only by that session (``view(session)``): slot i of a page is
    ``view(session)[i]``. ``session`` is any string naming a visitor (the app passes gradio's
    session hash); ``None`` means no session: the shared adapters only."""

    def __init__(self, pipe, max_upload_mb: float = 512.0, max_adapters: int = 8,
                 max_uploads: Optional[int] = None, session_ttl_s: float = 3600.0, max_grid_cells: int = 16,
                 num_frames: Optional[int] = None):
        self.pipe = pipe
        self.video = media.is_video(pipe)  # a video pipeline: results are animated files, grid cells first frames
        if num_frames is not None and not self.video:
            raise ValueError(f"--num-frames: {type(pipe).__name__} makes images, not videos.")
        self.num_frames = (num_frames or media.default_frames(pipe)) if self.video else None
        self.fps = media.fps_of(pipe) if self.video else 0.0
        self._media_dir: Optional[Path] = None  # the animated files handed to the page (the last MEDIA_KEPT)
        self.max_grid_cells = max_grid_cells
        self.max_upload_mb = max_upload_mb
        self.max_adapters = max_adapters  # slots of one page: shared adapters + that session's uploads
        self.max_uploads = 4 * max_adapters if max_uploads is None else max_uploads  # all sessions together
        self.session_ttl_s = session_ttl_s
        self.adapters: list[AdapterInfo] = []  # shared, load order; never reordered (UI slots index it)
        self.sessions: dict[str, _Session] = {}
        self._keys = itertools.count(1)
        self.lock = threading.RLock()
        params = inspect.signature(pipe.__call__).parameters
        self.accepts = set(params)
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        self.quantized = self.denoiser is not None and any(quantized.is_quantized(m) for m in self.denoiser.modules())
        self.merge_note = ""  # the last merge into quantized layers, as one line
        scale = getattr(pipe, "vae_scale_factor", 8)
        sample = getattr(getattr(self.denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        self.size_step = scale * (1 if getattr(pipe, "unet", None) is not None else 2)
        self.default_size = int(sample) * scale
        signature = {k: params[k].default for k in ("num_inference_steps", "guidance_scale") if k in params}
        self.defaults = model_defaults(getattr(pipe, "name_or_path", None), signature.get("num_inference_steps"),
                                       signature.get("guidance_scale"))
        self.default_steps = self.defaults.steps
        self.default_guidance = self.defaults.guidance
        self.examples = self.defaults.examples

    # -- who sees what -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The shared adapters' names."""
        return [a.name for a in self.adapters]

    def view(self, session: Optional[str] = None) -> list[AdapterInfo]:
        """What ``session`` sees, in slot order: the shared adapters, then its own uploads."""
        own = self.sessions.get(session) if session is not None else None
        return self.adapters + (list(own.uploads) if own else [])

    def names_for(self, session: Optional[str] = None) -> list[str]:
        return [a.name for a in self.view(session)]

    def uploads_held(self) -> int:
        return sum(len(s.uploads) for s in list(self.sessions.values()))  # list(): a snapshot, also off the lock

    def slots_left(self, session: Optional[str] = None) -> int:
        """Uploads ``session`` can still make: free slots of its page, within the global bound."""
        return max(0, min(self.max_adapters - len(self.view(session)), self.max_uploads - self.uploads_held()))

    def touch(self, session: Optional[str]) -> None:
        state = self.sessions.get(session) if session is not None else None
        if state is not None:
            state.last_seen = time.monotonic()

    def end_session(self, session: Optional[str]) -> int:
        """Delete ``session``'s uploads from the pipeline (the tab was closed, or it expired).
        Returns how many were freed."""
        with self.lock:
            own = self.sessions.pop(session, None) if session is not None else None
            for a in own.uploads if own else []:
                da.delete_adapter(self.pipe, a.key)
            return len(own.uploads) if own else 0

    def expire(self, now: Optional[float] = None) -> int:
        """End every session idle for more than ``session_ttl_s``; returns the uploads freed."""
        now = time.monotonic() if now is None else now
        idle = [s for s, state in list(self.sessions.items()) if now - state.last_seen > self.session_ttl_s]
        if not idle:  # the usual case: no need to wait for a running generation
            return 0
        with self.lock:
            return sum(self.end_session(s) for s in idle
                       if s in self.sessions and now - self.sessions[s].last_seen > self.session_ttl_s)

    def _unique(self, stem: str, taken: Sequence[str]) -> str:
        name, i = _clean_name(stem), 2
        base = name
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def _room(self, session: Optional[str]) -> None:
        """AdapterError if ``session`` may not add an adapter now (checked before and under the lock)."""
        if session is None:
            if len(self.adapters) >= self.max_adapters:
                raise AdapterError(f"This demo holds at most {self.max_adapters} adapters.")
            return
        if len(self.view(session)) >= self.max_adapters:
            raise AdapterError(
                f"All {self.max_adapters} adapter slots of this page are in use; your uploads are freed when you "
                "close or reload the page."
            )
        if self.uploads_held() >= self.max_uploads:
            self.expire()
            if self.uploads_held() >= self.max_uploads:
                raise AdapterError(
                    f"The demo holds its limit of {self.max_uploads} uploaded adapters for its visitors right now; "
                    f"try again later (uploads are freed when their page closes or after "
                    f"{self.session_ttl_s / 60:g} idle minutes)."
                )

    # -- adding adapters -----------------------------------------------------------------------
    def add_adapter(self, path, name: Optional[str] = None, shown: Optional[str] = None,
                    session: Optional[str] = None) -> AdapterInfo:
        """Read (once), describe and load one adapter (file or folder, any supported format).
        ``session=None``: a shared adapter; else an upload of that session, seen by it alone.
        AdapterError if it is unusable; the pipeline and every session are then unchanged (loading
        checks everything before it changes a thing). ``shown``: the name used in messages
        instead of the path (uploads: the original file name)."""
        path = Path(path)
        shown = shown or str(path)

        def why(exc):  # one line, with no server-side paths for uploads
            return _one_line(exc).replace(str(path), shown).replace(str(path.parent) + os.sep, "")

        self._room(session)
        try:
            kind = files.peek(path)
            # a community file's names resolve against the pipeline: read it under the lock
            adapter = None if kind == "community" else files.read(path, self.pipe)
        except Exception as exc:  # UnreadableAdapter, CheckpointError, unknown method, ...
            raise AdapterError(f"{shown} is not a readable adapter: {why(exc)}") from None
        with self.lock:
            self._room(session)
            stem = name or (path.stem if path.is_file() else path.name)
            keys = {a.key for a in self.adapters} | {a.key for s in self.sessions.values() for a in s.uploads}
            if session is None:
                name = key = self._unique(stem, sorted(keys))
            else:
                name = self._unique(stem, self.names_for(session))
                key = f"upload{next(self._keys)}_{name}"
                while key in keys:
                    key = f"upload{next(self._keys)}_{name}"
            if self.adapters or self.uploads_held():  # load into unmerged weights; generate() re-applies every choice
                da.unmerge_adapters(self.pipe)
            try:
                if adapter is None:
                    adapter = files.read(path, self.pipe)
                loaded = files.load(self.pipe, adapter, key)
            except files.UnreadableAdapter as exc:
                raise AdapterError(f"{shown} is not a readable adapter: {why(exc)}") from None
            except Exception as exc:
                raise AdapterError(f"{shown} does not fit this pipeline: {why(exc)}") from None
            try:
                info = files.describe_adapter(loaded)
                meta = info["metadata"]
                entry = AdapterInfo(
                    name=name,
                    source=shown,
                    method=str(info["method"]),
                    parameters=sum(c["parameters"] for c in info["components"].values()),
                    size_bytes=info["size_bytes"],
                    trigger=trigger_of(meta),
                    metadata=meta,
                    key=key,
                    owner=session,
                )
            except Exception as exc:  # never expected; the pipeline must not keep what is not listed
                da.delete_adapter(self.pipe, key)
                raise AdapterError(f"{shown} cannot be described: {why(exc)}") from None
            if session is None:
                self.adapters.append(entry)
            else:
                self.sessions.setdefault(session, _Session()).uploads.append(entry)
                self.touch(session)
        return entry

    def add_upload(self, path, original_name: Optional[str] = None, session: Optional[str] = None) -> AdapterInfo:
        """An uploaded file: ``.safetensors`` only, at most ``max_upload_mb``, then ``add_adapter``
        for ``session`` (None: shared, for code that runs the app itself)."""
        path = Path(path)
        shown = original_name or path.name
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise AdapterError(f"{shown}: only .safetensors adapter files can be uploaded.")
        size = path.stat().st_size
        if size > self.max_upload_mb * 2**20:
            raise AdapterError(f"{shown}: {size / 2**20:.1f} MB is over the {self.max_upload_mb:g} MB upload limit.")
        return self.add_adapter(path, Path(shown).stem, shown=shown, session=session)

    # -- generating ----------------------------------------------------------------------------
    def _apply(self, adapters: list[tuple[str, float]], merged: bool) -> None:
        """Make exactly ``adapters`` (pipeline keys) active, in order, in ``merged`` or live mode.
        Under the lock."""
        if not self.adapters and not self.uploads_held():
            return
        if not merged:
            da.unmerge_adapters(self.pipe)  # a no-op when nothing is merged
        da.set_adapters(self.pipe, [n for n, _ in adapters], [s for _, s in adapters])  # merged: a merge-switch
        if merged:
            if self.quantized:  # requantized (report), or refused and kept live (why): shown with the result
                self.merge_note = quantized.merge_or_keep_live(self.pipe)
            else:
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
        if self.video:  # float frames in [0, 1]: rounded to uint8 as diffusers rounds them (media.to_uint8)
            kwargs["output_type"] = "np"
            if req.num_frames or self.num_frames:
                kwargs["num_frames"] = int(req.num_frames or self.num_frames)
        with torch.no_grad():
            out = self.pipe(**kwargs)
        return media.videos(out)[0] if self.video else [out.images[0]]

    def _animated(self, frames) -> str:
        """``frames`` written as an animated WebP under the system's temp folder (gradio serves
        files from there); only the last ``MEDIA_KEPT`` such files are kept."""
        import uuid

        if self._media_dir is None:
            self._media_dir = Path(tempfile.mkdtemp(prefix="diffadapt_app_"))
        path = media.save_animated(frames, self._media_dir / f"{uuid.uuid4().hex}.webp", self.fps)
        for old in sorted(self._media_dir.glob("*.webp"), key=lambda f: f.stat().st_mtime)[:-MEDIA_KEPT]:
            old.unlink(missing_ok=True)
        return str(path)

    def check(self, req: GenerateRequest, session: Optional[str] = None) -> list[tuple[str, float]]:
        """The request's adapters as (name, strength), or ValueError naming what is wrong."""
        if req.mode not in ("live", "merged"):
            raise ValueError(f"mode must be 'live' or 'merged', not {req.mode!r}.")
        if not str(req.prompt).strip():
            raise ValueError("Write a prompt first.")
        if not _whole(req.steps) or not 1 <= float(req.steps) <= 200:
            raise ValueError(f"Steps must be a whole number from 1 to 200 (got {req.steps!r}).")
        if not _finite(req.guidance):
            raise ValueError(f"Guidance must be a finite number (got {req.guidance!r}).")
        if req.seed is not None and (not _whole(req.seed) or not 0 <= float(req.seed) <= MAX_SEED):
            raise ValueError(f"Seed must be a whole number from 0 to {MAX_SEED} (got {req.seed!r}).")
        for side in (req.width, req.height):
            if side and (not _whole(side) or int(float(side)) % self.size_step or not 0 < float(side) <= 4096):
                raise ValueError(f"Width and height must be multiples of {self.size_step} up to 4096 (got {side}).")
        if req.num_frames is not None and not self.video:
            raise ValueError(f"Frames: {type(self.pipe).__name__} makes images, not videos.")
        if req.num_frames is not None and (not _whole(req.num_frames) or not 1 <= float(req.num_frames) <= 1000):
            raise ValueError(f"Frames must be a whole number from 1 to 1000 (got {req.num_frames!r}).")
        adapters = [(str(n), s) for n, s in req.adapters]
        for n, s in adapters:
            if not _finite(s):
                raise ValueError(f"Strength of adapter {n!r} must be a finite number (got {s!r}).")
        adapters = [(n, float(s)) for n, s in adapters]
        names = self.names_for(session)
        unknown = [n for n, _ in adapters if n not in names]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {names}.")
        if len({n for n, _ in adapters}) != len(adapters):
            raise ValueError("An adapter can be chosen once per request.")
        return adapters

    def generate(self, req: GenerateRequest, progress: Optional[Callable[[int, int], None]] = None,
                 session: Optional[str] = None) -> GenerateResult:
        """Render ``req`` with exactly its adapters/strengths/mode (and, side by side, without),
        choosing among what ``session`` sees."""
        self.touch(session)
        self.expire()
        self.check(req, session)  # fail before waiting for the lock
        seed = random.randint(0, MAX_SEED) if req.seed is None else int(req.seed)
        total = int(req.steps) * (2 if req.side_by_side else 1)
        with self.lock:
            adapters = self.check(req, session)  # again: the session's uploads cannot vanish now
            keys = {a.name: a.key or a.name for a in self.view(session)}
            t0 = time.perf_counter()
            self.merge_note = ""
            self._apply([(keys[n], s) for n, s in adapters], req.mode == "merged")
            merge_note = self.merge_note
            switch_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            renders = [self._render(req, seed, progress, 0, total)]
            if req.side_by_side:
                self._apply([], req.mode == "merged")
                renders.append(self._render(req, seed, progress, int(req.steps), total))
            generation_s = time.perf_counter() - t0
            images = [frames[0] for frames in renders]
            shown = [self._animated(frames) for frames in renders] if self.video else images  # (the lock: one pruner)
        used = ", ".join(f"{n} @ {s:g}" for n, s in adapters) or "no adapters"
        captions = [f"with {used}"] + (["without adapters"] if req.side_by_side else [])
        return GenerateResult(images, captions, adapters, req.mode, seed, switch_ms, generation_s, merge_note,
                              videos=renders if self.video else [], fps=self.fps, media=shown)

    def grid(self, req: GenerateRequest, strengths, progress: Optional[Callable[[int, int], None]] = None,
             session: Optional[str] = None) -> GridResult:
        """Adapters (rows: ``req.adapters``' names, their strengths ignored) x ``strengths``
        (columns): each cell is that adapter alone at that strength, with one seed for every cell,
        rendered exactly as ``generate`` renders it. At most ``max_grid_cells`` cells."""
        self.touch(session)
        self.expire()
        strengths = parse_strengths(strengths)
        req = GenerateRequest(**{**req.__dict__, "adapters": [(n, 1.0) for n, _ in req.adapters], "side_by_side": False})
        rows = [n for n, _ in self.check(req, session)]
        if not rows:
            raise ValueError("Grid: check at least one adapter (the grid's rows).")
        cells = len(rows) * len(strengths)
        if cells > self.max_grid_cells:
            raise ValueError(f"Grid: {len(rows)} adapter(s) x {len(strengths)} strength(s) = {cells} images is over this "
                             f"demo's limit of {self.max_grid_cells}; check fewer adapters or give fewer strengths.")
        seed = random.randint(0, MAX_SEED) if req.seed is None else int(req.seed)
        steps = int(req.steps)
        with self.lock:
            self.check(req, session)  # again, under the lock: the session's uploads cannot vanish now
            keys = {a.name: a.key or a.name for a in self.view(session)}
            t0 = time.perf_counter()
            images, notes = [], []
            for r, name in enumerate(rows):
                images.append([])
                for c, strength in enumerate(strengths):
                    self.merge_note = ""
                    self._apply([(keys[name], strength)], req.mode == "merged")
                    if self.merge_note:
                        notes.append(f"{name} @ {strength:g}: {self.merge_note}")
                    frames = self._render(req, seed, progress, (r * len(strengths) + c) * steps, cells * steps)
                    images[-1].append(frames[0])  # a video: its first frame
            generation_s = time.perf_counter() - t0
        image, origin, size = compose_grid(images, rows, strengths)
        return GridResult(image, images, rows, strengths, req.mode, seed, origin, size, generation_s, "; ".join(notes),
                          VIDEO_GRID_NOTE if self.video else "")

    # -- what the prompt box is prefilled with -------------------------------------------------------
    def prefill(self, checked: Sequence[bool], session: Optional[str] = None) -> str:
        """The prompt for these checked slots: their adapters' trigger prompts, joined; with none,
        the model's first example prompt."""
        view = self.view(session)
        triggers = [view[i].trigger for i, on in enumerate(checked) if on and i < len(view) and view[i].trigger]
        return ", ".join(dict.fromkeys(triggers)) or (self.examples[0] if self.examples else "")

    def prompt_after(self, prompt, filled, checked: Sequence[bool], session: Optional[str] = None) -> Optional[str]:
        """The prompt once ``checked`` are the checked slots: their prefill if the prompt is empty
        or still ``filled`` (what the page last put there); None (leave it) once the visitor wrote
        their own or picked an example."""
        text = " ".join(str(prompt or "").split())
        if text and text != " ".join(str(filled or "").split()):
            return None
        new = self.prefill(checked, session)
        return None if new == prompt else new

    # -- what the page shows (everything from a file escaped) ------------------------------------
    def table(self, session: Optional[str] = None) -> str:
        view = self.view(session)
        if not view:
            return "_No adapters loaded yet: upload a `.safetensors` adapter file below._"
        rows = ["| adapter | method | trainable parameters | file size | trigger / instance prompt | base model | yours |",
                "|---|---|---|---|---|---|---|"]
        for a in view:
            meta = a.metadata
            base = meta.get("base_model") or meta.get("ss_sd_model_name") or ""
            rows.append(
                f"| {_md(a.name)} | {_md(a.method)} | {a.parameters:,} | {_size(a.size_bytes)} | "
                f"{_md(a.trigger) or '—'} | {_md(base) or '—'} | {'uploaded' if a.owner is not None else 'shared'} |"
            )
        return "\n".join(rows)

    def slots_text(self, session: Optional[str] = None) -> str:
        left, own = self.slots_left(session), len(self.view(session)) - len(self.adapters)
        room = self.max_adapters - len(self.adapters)
        if room <= 0 or self.max_uploads <= 0:
            return "This demo takes no uploads." + (" Every adapter slot holds a shared adapter." if room <= 0 else "")
        if left == 0 and own < room:
            return (f"**No upload slot free right now**: the demo holds its limit of {self.max_uploads} uploads for its "
                    f"visitors; try again in a few minutes.")
        return (f"**{left} of {room} upload slots left.** Your uploads are visible to you only and are removed when "
                f"you close or reload this page, or after {self.session_ttl_s / 60:g} minutes without a request.")


VIDEO_GRID_NOTE = "Video pipeline: each grid cell is the **first frame** of that cell's video."


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _whole(value) -> bool:
    return _finite(value) and float(value).is_integer()


def _md(value, limit: int = 300) -> str:
    """``value`` (text from a file: names, metadata, config values, errors about it) as inert
    Markdown: every character Markdown, HTML, LaTeX or autolinking could act on becomes a numeric
    character reference, which the page shows as that character; whitespace runs become one space."""
    text = " ".join(str(value).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    out = []
    for i, ch in enumerate(text):
        inner = ch in "_-" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        out.append(ch if (ch.isascii() and ch.isalnum()) or ch == " " or inner else f"&#{ord(ch)};")
    return "".join(out)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def create_app(model=None, adapters: Sequence[str] = (), device="cpu", dtype="float32", quantize=None,
               **kwargs) -> DemoApp:
    app = DemoApp(load_pipeline(model, device, dtype, quantize), **kwargs)
    for path in find_adapters(adapters):
        app.add_adapter(path)
    return app


# -- the UI ----------------------------------------------------------------------------------------
def _session_of(request) -> str:
    """The browser session a gradio request comes from (gradio_client: one per Client)."""
    return getattr(request, "session_hash", None) or "no-session"


def _takes_request(fn):
    """gradio passes a gr.Request to a parameter annotated so (set here: this module's
    annotations are strings, and gradio is imported inside build_ui)."""
    import gradio as gr

    fn.__annotations__ = {"request": gr.Request}
    return fn


def build_ui(app: DemoApp):
    import gradio as gr

    n_slots = app.max_adapters
    size_ok = {"width", "height"} <= app.accepts
    inert = dict(latex_delimiters=[], sanitize_html=True)  # text from files: escaped, and no LaTeX either

    with gr.Blocks(title="diffadapt demo") as demo:
        gr.Markdown(f"## diffadapt demo · `{type(app.pipe).__name__}`\nAdapters switch per request; the base model is loaded once."
                    + (f"  \nVideo pipeline: each result is an animated WebP of {app.num_frames or 'its default number of'} "
                       f"frames at {app.fps:g} fps (`--num-frames` sets how many)." if app.video else ""))
        with gr.Row():
            with gr.Column():
                shared = len(app.adapters[:n_slots])  # the shared adapters open checked, their triggers in the prompt
                prompt = gr.Textbox(label="Prompt", value=app.prefill([True] * shared), elem_id="prompt")
                filled = gr.State(app.prefill([True] * shared))  # what the page last put in the prompt box
                if app.examples:
                    gr.Examples([[e] for e in app.examples], inputs=[prompt], label="Example prompts", elem_id="examples")
                negative = gr.Textbox(label="Negative prompt", visible="negative_prompt" in app.accepts, elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                    random_seed = gr.Checkbox(label="random seed", value=False, elem_id="random_seed")
                steps = gr.Slider(1, max(100, app.default_steps), value=app.default_steps, step=1, label="Steps",
                                  elem_id="steps")
                guidance = gr.Slider(0, max(20, math.ceil(app.default_guidance)), value=app.default_guidance, step=0.5,
                                     label="Guidance",
                                     visible="guidance_scale" in app.accepts, elem_id="guidance")
                with gr.Row(visible=size_ok):
                    lo, hi = app.size_step * max(1, app.default_size // app.size_step // 4), app.default_size * 2
                    width = gr.Slider(lo, hi, value=app.default_size, step=app.size_step, label="Width", elem_id="width")
                    height = gr.Slider(lo, hi, value=app.default_size, step=app.size_step, label="Height", elem_id="height")
                with gr.Row():
                    mode = gr.Radio(["live", "merged"], value="live", label="Adapter mode", elem_id="mode")
                    side = gr.Checkbox(label="side by side: same seed without adapters", elem_id="side")
                gr.Markdown("### Active adapters and strengths")
                rows, uses, strengths = [], [], []  # one slot per adapter this session sees, in slot order
                for i in range(n_slots):
                    name = app.names[i] if i < len(app.adapters) else ""
                    with gr.Row(visible=bool(name)) as row:
                        uses.append(gr.Checkbox(label=name, value=bool(name), elem_id=f"use_{i}"))
                        strengths.append(gr.Slider(0, 2, value=1.0, step=0.05, label=f"{name} strength", elem_id=f"strength_{i}"))
                    rows.append(row)
                upload = gr.File(label="Add an adapter (.safetensors: diffadapt, PEFT or LyCORIS/kohya/ComfyUI OFT/BOFT)",
                                 file_types=[".safetensors"], height=110, elem_id="upload")
                slots = gr.Markdown(app.slots_text(None), elem_id="slots", **inert)
                upload_status = gr.Markdown(elem_id="upload_status", **inert)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Strength grid (X/Y plot): checked adapters x strengths", open=True):
                    grid_strengths = gr.Textbox(label="Grid strengths (columns; every checked adapter is a row, alone)",
                                                value="0, 0.5, 1", elem_id="grid_strengths")
                    grid_button = gr.Button(f"Make grid (at most {app.max_grid_cells} images, one seed)",
                                            elem_id="make_grid")
                    if app.video:
                        gr.Markdown(VIDEO_GRID_NOTE, elem_id="grid_note")
            with gr.Column():
                gallery = gr.Gallery(label="Result", columns=2, format="png", preview=False, object_fit="contain",
                                     height=420, elem_id="result")
                info = gr.Markdown(elem_id="info", **inert)
                with gr.Accordion("details (JSON)", open=False):
                    details = gr.JSON(elem_id="details")
        gr.Markdown("### Loaded adapters")
        table = gr.Markdown(app.table(None), elem_id="adapters_table", **inert)

        @_takes_request
        def on_generate(request, progress=gr.Progress(), *values):
            session = _session_of(request)
            p, neg, s, rnd, st, g, w, h, md, sbs = values[:10]
            use, strength = values[10 : 10 + n_slots], values[10 + n_slots :]
            view = app.view(session)
            if any(use[len(view):]):
                raise gr.Error("An adapter you chose is no longer loaded (uploads are removed after "
                               f"{app.session_ttl_s / 60:g} idle minutes); upload it again.")
            try:
                chosen = [(a.name, float(strength[i])) for i, a in enumerate(view[:n_slots]) if use[i]]
                req = GenerateRequest(p, chosen, neg or "", None if rnd else int(s or 0), int(st), float(g),
                                      int(w) if size_ok else None, int(h) if size_ok else None, md, bool(sbs))
                res = app.generate(req, lambda i, n: progress((i, n), desc="denoising"), session=session)
            except Exception as exc:  # a message in the page, never a crash (gradio renders it as HTML)
                raise gr.Error(html.escape(_one_line(exc))) from None
            return list(zip(res.media, res.captions)), res.summary(), res.as_dict()  # video: animated files

        @_takes_request
        def on_grid(request, progress=gr.Progress(), *values):
            session = _session_of(request)
            p, neg, s, rnd, st, g, w, h, md, _ = values[:10]
            use, grid_text = values[10 : 10 + n_slots], values[-1]
            view = app.view(session)
            if any(use[len(view):]):
                raise gr.Error("An adapter you chose is no longer loaded (uploads are removed after "
                               f"{app.session_ttl_s / 60:g} idle minutes); upload it again.")
            try:
                chosen = [(a.name, 1.0) for i, a in enumerate(view[:n_slots]) if use[i]]
                req = GenerateRequest(p, chosen, neg or "", None if rnd else int(s or 0), int(st), float(g),
                                      int(w) if size_ok else None, int(h) if size_ok else None, md)
                res = app.grid(req, grid_text, lambda i, n: progress((i, n), desc="grid"), session=session)
            except Exception as exc:  # a message in the page, never a crash
                raise gr.Error(html.escape(_one_line(exc))) from None
            return [(res.image, res.caption)], res.summary(), res.as_dict()

        def page(session, check=None):  # table, slots text, then rows, checkboxes, slider labels
            names = app.names_for(session)[:n_slots]
            names += [""] * (n_slots - len(names))
            return ([app.table(session), app.slots_text(session)] + [gr.update(visible=bool(n)) for n in names]
                    + [gr.update(label=n, **({"value": True} if i == check else {})) for i, n in enumerate(names)]
                    + [gr.update(label=f"{n} strength") for n in names])

        def on_use(slot):  # a checkbox the visitor (un)checked: an untouched prompt gets the checked triggers
            @_takes_request
            def handler(request, p, last, *checked):
                new = app.prompt_after(p, last, list(checked), _session_of(request))
                return (gr.skip(), gr.skip()) if new is None else (new, new)

            handler.__name__ = "on_use"
            return handler

        @_takes_request
        def on_upload(request, file, p=None, last=None, *checked):
            session = _session_of(request)
            app.touch(session)
            app.expire()
            keep = [gr.skip(), gr.skip()]  # prompt, what the page last put there
            if file is None:
                return ["", *page(session), *keep]
            path = Path(file if isinstance(file, str) else file.name)  # gradio keeps the original name
            try:
                a = app.add_upload(path, path.name, session=session)
                msg = f"Loaded **{_md(a.name)}** ({_md(a.method)}, {a.parameters:,} parameters)."
                slot = app.names_for(session).index(a.name)
                if slot < n_slots:  # the new adapter is checked; its trigger joins an untouched prompt
                    after = (list(checked) + [False] * n_slots)[:n_slots]
                    after[slot] = True
                    text = None if p is None else app.prompt_after(p, last, after, session)
                    return [msg, *page(session, check=slot), *(keep if text is None else [text, text])]
            except Exception as exc:  # AdapterError (or anything else): a message, never a crash
                gr.Warning(html.escape(_one_line(exc)))
                msg = f"**Upload refused:** {_md(_one_line(exc), limit=600)}"
            return [msg, *page(session), *keep]

        @_takes_request
        def on_load(request):
            session = _session_of(request)
            app.touch(session)
            app.expire()
            return page(session)

        @_takes_request
        def on_unload(request):  # the tab was closed or reloaded: its uploads go
            app.end_session(_session_of(request))

        controls = [prompt, negative, seed, random_seed, steps, guidance, width, height, mode, side, *uses, *strengths]
        page_outputs = [table, slots, *rows, *uses, *strengths]
        button.click(on_generate, controls, [gallery, info, details], api_name="generate", concurrency_limit=1,
                     concurrency_id="generate")
        prompt.submit(on_generate, controls, [gallery, info, details], api_name=False, concurrency_limit=1,
                      concurrency_id="generate")
        grid_button.click(on_grid, [*controls, grid_strengths], [gallery, info, details], api_name="grid",
                          concurrency_limit=1, concurrency_id="generate")
        for i, use in enumerate(uses):
            use.input(on_use(i), [prompt, filled, *uses], [prompt, filled], api_name=False, show_progress="hidden")
        upload.upload(on_upload, [upload, prompt, filled, *uses], [upload_status, *page_outputs, prompt, filled],
                      api_name="upload_adapter")
        demo.load(on_load, None, page_outputs, api_name=False)
        demo.unload(on_unload)
    demo.queue(default_concurrency_limit=1)
    return demo


def _number(kind, low, what):
    """argparse type: a finite number of ``kind`` >= ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be {what} >= {low:g}, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _Parser(prog="app.py", description="Gradio demo of diffadapt adapters on a diffusers pipeline.")
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: the embedded model)")
    parser.add_argument("--adapters", nargs="*", default=[], help="shared adapters: files/folders, or folders holding them")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_number(int, 0, "a port number"), default=7860)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                        help="quantize the denoiser's Linear layers with bitsandbytes after loading; adapters switch "
                        "live on them, merged mode requantizes (the report is shown) or stays live when refused")
    parser.add_argument("--max-upload-mb", type=_number(float, 0.001, "a number of MB"), default=512.0)
    parser.add_argument("--max-adapters", type=_number(int, 1, "a whole number"), default=8,
                        help="adapter slots of a page: the shared adapters plus that visitor's uploads")
    parser.add_argument("--max-uploads", type=_number(int, 0, "a whole number"), default=None,
                        help="uploaded adapters held for all visitors together (default: 4 x --max-adapters)")
    parser.add_argument("--session-minutes", type=_number(float, 1, "a number of minutes"), default=60.0,
                        help="an upload is removed after this long without a request from its page")
    parser.add_argument("--max-grid-cells", type=_number(int, 1, "a whole number"), default=16,
                        help="most images one strength grid (adapters x strengths) may hold")
    parser.add_argument("--num-frames", type=_number(int, 1, "a whole number"), default=None,
                        help="video pipelines: frames per video (default: the pipeline's own; Wan: 81, and 4k+1 frames)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    notices.quiet_import_notices()  # before the pipeline (and diffusers) loads
    if args.port > 65535:
        print(f"app.py: error: argument --port: must be a port number from 0 to 65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        app = create_app(args.model, args.adapters, args.device, args.dtype, quantize=args.quantize,
                         max_upload_mb=args.max_upload_mb, max_adapters=args.max_adapters,
                         max_uploads=args.max_uploads, session_ttl_s=args.session_minutes * 60,
                         max_grid_cells=args.max_grid_cells, num_frames=args.num_frames)
    except (AdapterError, OSError, ValueError, ImportError) as exc:
        print(f"app.py: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(f"loaded {type(app.pipe).__name__}; shared adapters: {', '.join(app.names) or 'none'}")
    build_ui(app).launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb:g}mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
