"""Notices optional packages log while they are imported that say nothing about the user's run
(a CUDA kernel library missing on a CPU build, a deprecation between two other packages), and a
switch for the faces (CLI, app, training scripts) to drop them. The library itself never calls it:
a user's own logging stays as they configured it.

Each entry is a logger name and parts of the message, matched exactly as the packages log them.
"""

from __future__ import annotations

import logging

IMPORT_NOTICES: dict[str, tuple[str, ...]] = {
    # transformers: image processors fall back to PIL without torchvision (pipelines never call them)
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # bitsandbytes: its optional CPU 4-bit kernel package ("kernels") is absent
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # torchao on a CPU-only torch: its CUDA extensions do not load
    "torchao": ("Failed to load",),
    # torchao registers Enums with torch's pytree, which torch 2.13 deprecates
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    # diffusers' torchao quantizer when the installed torchao lacks some tensor classes
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of ``parts``."""

    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in self.parts)


_INSTALLED: dict[str, _DropMessages] = {}


def quiet_import_notices(keep: tuple[str, ...] = ()) -> None:
    """Drop :data:`IMPORT_NOTICES` (except the loggers in ``keep``); call it before the packages
    are imported. Idempotent."""
    for name, parts in IMPORT_NOTICES.items():
        if name not in keep and name not in _INSTALLED:
            _INSTALLED[name] = _DropMessages(parts)
            logging.getLogger(name).addFilter(_INSTALLED[name])
