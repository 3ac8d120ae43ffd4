"""An adapter read from a file, before any model: what every format's reader returns and the
fitting step (:mod:`diffadapt.fitting`) takes; the refusals both raise.

Loading goes one way: read (a format: file -> :class:`AdapterRecord`, no model), fit
(:func:`diffadapt.fitting.fit`: record + model -> slots, every shape checked before anything is
allocated), install (:func:`diffadapt.model.install_slots`: one swap that cannot fail half-way).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from diffadapt.methods import AdapterConfig, AdapterConfigError, LayerSpec
from diffadapt.patterns import shorten

PREFIX = "base_model.model."  # the key prefix of a layer's tensors: <PREFIX><module path>.<suffix>
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_LONG_WORD = re.compile(r"\S{200,}")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SameNames(dict):
    """The key map (our parameter name -> key suffix) of a method written under its own parameter
    names: every name maps to itself, and a file key's suffix is its last dotted part."""

    def __missing__(self, key: str) -> str:
        return key


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into, or is not readable. The
    message is always one line."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split())
        if len(text) > 1500:  # hostile values quoted in a message: keep their start
            text = _LONG_WORD.sub(lambda m: m.group(0)[:120] + f"...({len(m.group(0))} chars)", text)
        super().__init__(text)


class CheckpointConfigError(CheckpointError, AdapterConfigError):
    """A file whose adapter config is invalid, or does not fit this model's layers."""


@contextlib.contextmanager
def refusing(source: object) -> Iterator[None]:
    """Turn whatever a malformed file makes the code below raise into one-line CheckpointError
    naming ``source`` (the file): wrong types, missing keys, deep nesting, overflowing numbers."""
    where = str(source)
    try:
        yield
    except _OUT_OF_MEMORY:
        raise  # a real limit of this machine, not a property of the file
    except CheckpointError as exc:
        msg = str(exc)
        raise type(exc)(msg if where in msg else f"{where}: {msg}") from None
    except AdapterConfigError as exc:
        raise CheckpointConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: nested too deeply to be an adapter file.") from None
    except (KeyError, TypeError, AttributeError, IndexError, OverflowError, ValueError, RuntimeError) as exc:
        kind = {KeyError: "missing field", IndexError: "missing entry"}.get(type(exc), type(exc).__name__)
        detail = shorten(exc.args[0], 200) if isinstance(exc, KeyError) and exc.args else str(exc)[:300]
        raise CheckpointError(f"{where} is malformed ({kind}: {detail}); it is not an adapter diffadapt can load.") from None


def tensor_key(key: object) -> str:
    """A tensor key for a message: as it is if short and printable, else its truncated repr."""
    if isinstance(key, str) and len(key) <= 200 and key.isprintable():
        return key
    return shorten(key, 200)


def value_problem(key: str, value: torch.Tensor, want: Optional[torch.dtype] = None) -> Optional[str]:
    """Why ``value`` cannot be loaded (a non-float, or a NaN / inf that would give black images)."""
    if want is not None and not want.is_floating_point:
        return None if value.dtype == want else f"{tensor_key(key)} is {value.dtype}, the module's is {want}"
    if value.dtype not in _FLOATS:
        return f"{tensor_key(key)} is {value.dtype} (adapter values are float16/bfloat16/float32/float64)"
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        return f"{tensor_key(key)} holds {bad} NaN/inf value(s) (a diverged training run?)"
    return None



@dataclass
class AdapterRecord:
    """One adapter as a file holds it, fitted to no model yet.

    ``tensors`` under the file's keys (``<PREFIX><module path>.<suffix>`` for layer parameters,
    ``modules_to_save`` values likewise, other keys for state shared by layers); ``keys`` maps
    each adapter parameter to its ``<suffix>``; ``config_for_saved(config, shapes)`` is the config
    the tensors were really trained with (``shapes``: one layer's parameter shapes);
    ``shared_from_saved(config, specs, weights, tensors)`` builds the method's shared state from the
    non-layer tensors. The format that read the file supplies the last three.
    """

    config: AdapterConfig
    tensors: dict[str, Tensor]
    keys: dict[str, str]
    config_for_saved: Callable[[AdapterConfig, dict[str, tuple[int, ...]]], AdapterConfig]
    shared_from_saved: Callable[[AdapterConfig, list[LayerSpec], list[Tensor], dict[str, Tensor]], list[dict[str, Tensor]]]
    source: object = "the file"
