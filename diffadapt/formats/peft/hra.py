"""HRA in PEFT's files: ``HRAConfig``, ``<path>.hra_u``."""

from __future__ import annotations

from typing import Any

from diffadapt.formats.peft import PeftFormat, sorted_lists
from diffadapt.methods import AdapterConfigError
from diffadapt.methods.base import TARGETING_FIELDS
from diffadapt.methods.hra import HRAConfig

_FIELDS = ("r", "apply_GS", "init_weights", "bias") + tuple(f for f in TARGETING_FIELDS if f != "overrides")


def to_dict(config: HRAConfig) -> dict[str, Any]:
    if config.overrides:
        raise AdapterConfigError(
            f"HRAConfig: PEFT's HRAConfig has no per-layer settings, so overrides={config.overrides!r} "
            "cannot be written in PEFT format. Save in diffadapt format or drop the overrides."
        )
    return sorted_lists({k: getattr(config, k) for k in _FIELDS})


def from_dict(data: dict[str, Any]) -> HRAConfig:
    """Extra keys (peft_type, task_type, revision, ...) are ignored.

    PEFT accepts ``init_weights=True`` with odd ``r`` or ``apply_GS`` but then does *not*
    start at the identity; the loaded config says ``init_weights=False``, which is what
    PEFT actually did (the trained values are loaded over the init anyway).
    """
    kw = sorted_lists({k: data[k] for k in _FIELDS if k in data})
    r, gs = kw.get("r", HRAConfig.r), kw.get("apply_GS", HRAConfig.apply_GS)
    if kw.get("init_weights", True) and (gs or (isinstance(r, int) and r % 2)):
        kw["init_weights"] = False
    return HRAConfig(**kw)


FORMAT = PeftFormat("HRA", {"hra_u": "hra_u"}, to_dict, from_dict)
