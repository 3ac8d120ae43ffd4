"""What a saved pipeline adapter is, and which modules of a pipeline (or a model) verbs act on.

The lowest face-level module: ``pipeline`` and ``formats`` build on it, it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from diffadapt.methods import AdapterConfig

DENOISERS = ("unet", "transformer")


@dataclass(repr=False)
class PipelineAdapter:
    """A saved adapter for (some components of) a pipeline."""

    components: dict[str, tuple[AdapterConfig, dict[str, torch.Tensor]]]
    metadata: dict[str, Any] = field(default_factory=dict)  # method, base_model, instance_prompt, ...
    classes: dict[str, Optional[str]] = field(default_factory=dict)  # component -> model class name

    def __repr__(self) -> str:
        parts = ", ".join(f"{n or 'model'}: {c.method}" for n, (c, _) in self.components.items())
        return f"PipelineAdapter({parts})"


def components(obj: Any) -> dict[str, nn.Module]:
    """``{name: module}`` for a pipeline's modules, or ``{"": model}`` for a bare model."""
    if isinstance(obj, nn.Module):
        return {"": getattr(obj, "_orig_mod", obj)}  # torch.compile'd modules: act on the original
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"Expected a diffusers pipeline or a torch model, got {type(obj).__name__}.")
    return {name: getattr(m, "_orig_mod", m) for name, m in comps.items() if isinstance(m, nn.Module)}
