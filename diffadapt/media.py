"""What a pipeline makes, as files and pictures: images, or videos (lists of frames) written as
animated images with Pillow alone (no imageio / ffmpeg). The CLI and the Gradio app both use it.

A video pipeline is one whose ``__call__`` takes ``num_frames`` (Wan, CogVideoX, LTX, HunyuanVideo,
AnimateDiff, ...); its output has ``.frames`` (one entry per video: PIL frames, or a
``(videos, frames, height, width, 3)`` array in [0, 1], or a ``(videos, frames, 3, height, width)``
tensor) where an image pipeline's has ``.images``.

Videos are written as animated WebP by default: lossless, so every frame is the pipeline's
uint8 frame exactly, in full colour; ``.gif`` also works (256 colours per frame, dithered).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional, Sequence

VIDEO_SUFFIXES = (".webp", ".gif")  # animated images Pillow writes
DEFAULT_FPS = 16.0  # Wan's frame rate (diffusers' Wan examples export at 16 fps)


def _params(pipe) -> dict:
    """The parameters of ``pipe``'s ``__call__`` (a pipeline or its class)."""
    try:
        return dict(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return {}


def is_video(pipe) -> bool:
    """Whether ``pipe`` (a pipeline or a pipeline class) makes videos: its ``__call__`` takes ``num_frames``."""
    return "num_frames" in _params(pipe)


def default_frames(pipe) -> Optional[int]:
    """The ``num_frames`` a video pipeline makes by default (Wan: 81), or None."""
    param = _params(pipe).get("num_frames")
    default = None if param is None else param.default
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def fps_of(pipe) -> float:
    """The frame rate a video pipeline's frames are meant for: its ``__call__``'s ``fps`` /
    ``frame_rate`` default (SVD, LTX), else a ``fps`` attribute, else ``DEFAULT_FPS``."""
    params = _params(pipe)
    for name in ("fps", "frame_rate"):
        default = params[name].default if name in params else None
        if isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0:
            return float(default)
    value = getattr(pipe, "fps", None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else DEFAULT_FPS


def to_uint8(array):
    """Float pixels in [0, 1] -> uint8, as diffusers' ``numpy_to_pil`` rounds them: ``x * 255`` in the
    array's own float dtype, then round half to even (in float64 a float32 ``x * 255`` that rounds to
    ``k + 0.5`` in float32 can land below it and give ``k``, one level off the pipeline's own PIL output)."""
    import numpy as np

    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return (array * 255).round().clip(0, 255).astype(np.uint8)


def _pictures(array) -> list:
    """(n, h, w, c) floats in [0, 1] or uint8 -> PIL images."""
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    pixels = array if array.dtype == np.uint8 else to_uint8(array)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


def videos(output) -> list[list]:
    """A video pipeline's output (or its ``.frames``) -> one list of PIL frames per video."""
    import numpy as np
    import torch

    frames = getattr(output, "frames", output)
    if isinstance(frames, torch.Tensor):  # (videos, frames, channels, height, width)
        frames = frames.detach().float().cpu().permute(0, 1, 3, 4, 2).numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim == 4:  # one video: (frames, height, width, channels)
            frames = frames[None]
        return [_pictures(video) for video in frames]
    return [list(video) if isinstance(video, (list, tuple)) else _pictures(video) for video in frames]


def check_output(path, pipe_name: str, video: bool) -> None:
    """ValueError (one line) if ``path`` cannot hold what the pipeline makes: a video needs an animated format."""
    suffix = Path(path).suffix.lower()
    if video and suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"{pipe_name} makes videos; {Path(path).name} ({suffix or 'no extension'}) cannot hold one: "
            f"give an animated {' or '.join(VIDEO_SUFFIXES)} file, e.g. --output out.webp (lossless)")


def save_animated(frames: Sequence, path, fps: float = DEFAULT_FPS):
    """Write ``frames`` (PIL images, one size) as an animated WebP (lossless) or GIF, looping, at
    ``fps`` (one frame's duration is rounded to whole milliseconds). Consecutive identical frames
    may be stored once with their durations summed (both formats' encoders do so). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path.name}: an animated image is written as {' or '.join(VIDEO_SUFFIXES)}")
    if not frames:
        raise ValueError("no frames to write")
    frames = [f.convert("RGB") for f in frames]
    extra = dict(lossless=True, quality=100, method=4) if suffix == ".webp" else dict(optimize=False, disposal=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0, **extra)
    return path
