"""OFT in PEFT's files (PEFT >= 0.18): ``OFTConfig``, ``<path>.oft_R.weight``."""

from __future__ import annotations

import warnings
from typing import Any

from diffadapt.formats.peft import PeftFormat
from diffadapt.formats.peft.boft import rotation_config, rotation_dict
from diffadapt.methods import AdapterConfigError
from diffadapt.methods.oft import OFTConfig

_FIELDS = (
    "r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
    "use_cayley_neumann", "num_cayley_neumann_terms",
)


def from_dict(data: dict[str, Any]) -> OFTConfig:
    """A missing ``use_cayley_neumann`` means PEFT's default, True. Files without
    ``oft_block_size`` are PEFT < 0.14 OFT, a different parameterization (PEFT refuses them too)."""
    if "oft_block_size" not in data:
        raise AdapterConfigError(
            "OFTConfig: this adapter_config.json has no oft_block_size, so it was written by PEFT < 0.14, "
            "whose OFT weights are incompatible with the current format. Retrain the adapter with "
            "PEFT >= 0.14 or diffadapt."
        )
    version = str(data.get("peft_version") or "0.0.0").partition("@")[0].split(".")
    numeric = tuple(int(v) if v.isdigit() else 0 for v in version[:2])
    if data.get("use_cayley_neumann", True) and numeric < (0, 18):
        warnings.warn(
            "OFT file from PEFT < 0.18 (or without peft_version) that uses the Cayley-Neumann series "
            "(explicitly or by PEFT's default): PEFT 0.18 changed that series, and older OFT used exact "
            "Cayley. The current series is computed, as PEFT does; if the adapter was trained with exact "
            "Cayley, set use_cayley_neumann=False."
        )
    return rotation_config(OFTConfig, data, use_cayley_neumann=True)


FORMAT = PeftFormat("OFT", {"oft_R": "oft_R.weight"}, lambda config: rotation_dict(config, _FIELDS), from_dict)
