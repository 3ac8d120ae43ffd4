"""FourierFT in PEFT's files: ``FourierFTConfig`` (``n_frequency_pattern`` for per-layer sizes),
``<path>.fourierft_spectrum``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from diffadapt.formats.peft import BOOKKEEPING, PeftFormat
from diffadapt.methods import AdapterConfigError
from diffadapt.methods.fourierft import FourierFTConfig


def to_dict(config: FourierFTConfig) -> dict[str, Any]:
    pattern: dict[str, int] = {}
    for pat, values in reversed(list(config.overrides.items())):  # ours: last match wins; PEFT: first
        if set(values) != {"n_frequency"}:
            raise AdapterConfigError(
                f"FourierFTConfig: override {pat!r} sets {sorted(values)}; a PEFT file can only vary "
                "n_frequency per layer (n_frequency_pattern). Drop the other keys to export."
            )
        # PEFT tests re.match(rf".*\.{key}$", name): literal dotted suffix, or full match of `pat`
        key = pat if re.fullmatch(r"\w+", pat) else f"{re.escape(pat)}$|(?:{pat})"
        pattern.setdefault(key, values["n_frequency"])
    for key, n in config.n_frequency_pattern.items():
        pattern.setdefault(key, n)
    names = ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "target_modules", "exclude_modules",
             "bias", "modules_to_save", "layers_to_transform", "layers_pattern", "init_weights")
    out = {k: getattr(config, k) for k in names}
    out["n_frequency_pattern"] = pattern
    return out


def from_dict(data: dict[str, Any]) -> FourierFTConfig:
    ours = {f.name for f in dataclasses.fields(FourierFTConfig)} - {"overrides", "fast_path"}
    # unknown keys holding a neutral value (None, False, {}, []) are harmless; others are refused
    skip = ours | BOOKKEEPING
    unknown = sorted(k for k, v in data.items() if k not in skip and v not in (None, False, {}, []))
    if unknown:
        raise AdapterConfigError(f"FourierFTConfig: PEFT config has fields diffadapt does not know: {unknown}.")
    kwargs = {k: v for k, v in data.items() if k in ours}
    if kwargs.get("n_frequency_pattern") is None:
        kwargs.pop("n_frequency_pattern", None)
    return FourierFTConfig(**kwargs)


FORMAT = PeftFormat("FOURIERFT", {"fourierft_spectrum": "fourierft_spectrum"}, to_dict, from_dict)
