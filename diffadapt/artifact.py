"""What a saved pipeline adapter is, and which modules of a pipeline (or a model) verbs act on.

The lowest face-level module: ``pipeline`` and ``formats`` build on it, it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from diffadapt.methods import AdapterConfig

DENOISERS = ("unet", "transformer")


@dataclass
class ComponentAdapter:
    """One component's part of a saved adapter: its config, its tensors (PEFT key names) and the
    class of the module it was made for (None when the file does not say). Unpacks as
    ``config, tensors``."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    model_class: Optional[str] = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.config, self.tensors))


@dataclass(repr=False)
class PipelineAdapter:
    """A saved adapter for (some components of) a pipeline: one :class:`ComponentAdapter` per
    component name. A single-model file read without a component name (a PEFT folder) names none:
    its part is ``unplaced`` until :meth:`placed` (loading places it on the pipeline's denoiser, or
    into the bare model it is loaded into)."""

    components: dict[str, ComponentAdapter]
    metadata: dict[str, Any] = field(default_factory=dict)  # method, base_model, instance_prompt, ...
    unplaced: Optional[ComponentAdapter] = None

    @property
    def classes(self) -> dict[str, Optional[str]]:
        """component -> class name of the module each part was made for (None: not said)."""
        return {n: c.model_class for n, c in self.components.items()}

    def parts(self) -> list[ComponentAdapter]:
        """Every part, the unplaced one included."""
        return [*self.components.values(), *([self.unplaced] if self.unplaced is not None else [])]

    def placed(self, name: str) -> "PipelineAdapter":
        """This adapter with its unplaced part as component ``name`` (itself if nothing is unplaced)."""
        if self.unplaced is None:
            return self
        return PipelineAdapter({**self.components, name: self.unplaced}, dict(self.metadata))

    def __repr__(self) -> str:
        named = [(n, c) for n, c in self.components.items()] + [("model", self.unplaced)] * (self.unplaced is not None)
        return "PipelineAdapter(" + ", ".join(f"{n}: {c.config.method}" for n, c in named) + ")"


def components(obj: Any) -> dict[str, nn.Module]:
    """``{name: module}`` for a pipeline's modules, or ``{"": model}`` for a bare model.

    Structural: every ``torch.nn.Module`` the pipeline registers, whatever its name or class
    (``unet``/``transformer``, ``text_encoder`` ... ``text_encoder_4``, ``controlnet``, ``vae``;
    CLIP, T5, Qwen2.5-VL, Qwen3, Gemma 2, Mistral 3, Llama encoders alike). A module registered
    under two names is one component, under its first name."""
    if isinstance(obj, nn.Module):
        return {"": getattr(obj, "_orig_mod", obj)}  # torch.compile'd modules: act on the original
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"Expected a diffusers pipeline or a torch model, got {type(obj).__name__}.")
    found: dict[str, nn.Module] = {}
    for name, m in comps.items():
        m = getattr(m, "_orig_mod", m)
        if isinstance(m, nn.Module) and all(m is not seen for seen in found.values()):
            found[name] = m
    return found


def _is_autoencoder(module: nn.Module) -> bool:
    return callable(getattr(module, "encode", None)) and callable(getattr(module, "decode", None))


def denoiser(mods: dict[str, nn.Module]) -> Optional[str]:
    """The component name of a pipeline's denoiser: ``unet`` or ``transformer``, else the one
    diffusers model that is neither an autoencoder nor a ControlNet (``prior``, ...); None when
    that is not one module."""
    named = next((n for n in DENOISERS if n in mods), None)
    if named is not None:
        return named
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    found = [
        n for n, m in mods.items()
        if isinstance(m, ModelMixin) and not _is_autoencoder(m) and "controlnet" not in n
    ]
    return found[0] if len(found) == 1 else None
