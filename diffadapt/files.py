"""Adapter files of every supported format, read once, against the model they are for.

One entry point for the command line and the demo app:

* :func:`peek` -- what a path is (``"diffadapt"``, ``"peft"`` or ``"community"``), from the
  safetensors header alone: cheap, for failing fast before a model loads;
* :func:`read` -- the adapter as a :class:`AdapterFile`, read once; LyCORIS / kohya / ComfyUI
  files resolve their module names against ``pipe`` (the pipeline or model they are for);
* :func:`load` -- read (or take an already read adapter) and load it into ``pipe`` under a name;
  atomic, as :func:`diffadapt.pipeline.load_adapter` is;
* :func:`describe` -- what ``diffadapt info`` prints and the app shows: method, components,
  layers, parameters, size, metadata. A community file without a model is described from its
  tensor names and shapes, with what cannot be told without the model.

Errors are :class:`~diffadapt.checkpoint.CheckpointError`; :class:`UnreadableAdapter` (a
subclass) when the path is not a readable adapter of any supported format at all, as opposed to
a readable one that does not fit the model.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from diffadapt.checkpoint import CONFIG_NAME, CheckpointError
from diffadapt.formats import lycoris
from diffadapt.pipeline import META_NAME, ComponentAdapter, PipelineAdapter, components, load_adapter, read_pipeline_adapter

KINDS = {"diffadapt": "diffadapt pipeline adapter", "peft": "PEFT adapter", "community": "LyCORIS/kohya/ComfyUI file"}
PathLike = Union[str, os.PathLike]


class UnreadableAdapter(CheckpointError):
    """Not a readable adapter of any supported format (missing, damaged, not safetensors, ...)."""


@dataclass(repr=False)
class AdapterFile(PipelineAdapter):
    """A :class:`PipelineAdapter` read from ``source``. It prints as its source, so the messages
    of ``load_adapter`` (which name what they load) name the file."""

    source: str = ""
    kind: str = ""  # a key of KINDS
    size_bytes: int = 0

    def __str__(self) -> str:
        return self.source


def size_of(path: PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Header metadata and tensor shapes of a safetensors file, without reading tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UnreadableAdapter(f"{path} is not a readable safetensors file: {' '.join(str(exc).split())}") from None


def peek(path: PathLike) -> str:
    """``"diffadapt"``, ``"peft"`` or ``"community"``: what ``path`` is, from names and the
    safetensors header only. UnreadableAdapter if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise UnreadableAdapter(f"No adapter at {path}.")
    if path.is_dir():
        if (path / META_NAME).is_file():
            return "diffadapt"
        if (path / CONFIG_NAME).is_file():
            return "peft"
        raise UnreadableAdapter(f"{path} is a folder without {META_NAME} or {CONFIG_NAME}: not an adapter folder.")
    meta, shapes = _header(path)
    if "diffadapt" in meta:
        return "diffadapt"
    if lycoris.is_community_file(dict.fromkeys(shapes)):  # looks at the key names only
        return "community"
    return "peft"


def read(path: PathLike, pipe: Any = None, component: Optional[str] = None) -> AdapterFile:
    """The adapter at ``path``, read once. ``pipe``: the pipeline or model it is for (needed to
    resolve a community file's module names); ``component``: of a plain PEFT adapter, or of
    ``lycoris_``-prefixed keys."""
    kind = peek(path)
    if kind == "community" and pipe is None:
        raise CheckpointError(
            f"{path} is a LyCORIS/kohya/ComfyUI file: its module names resolve only against the base model; "
            "give the model (--model) or load it into a pipeline."
        )
    try:
        adapter = read_pipeline_adapter(path, component, target=pipe)
    except CheckpointError as exc:
        if kind == "community":  # readable; its names or shapes do not fit this model
            raise
        raise UnreadableAdapter(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:  # bad JSON, unknown method, a broken config
        raise UnreadableAdapter(f"{path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    return AdapterFile(adapter.components, adapter.metadata, adapter.unplaced, str(path), kind, size_of(path))


def load(pipe: Any, adapter: Union[PathLike, AdapterFile], name: str, component: Optional[str] = None) -> AdapterFile:
    """Load ``adapter`` (a path, read here once against ``pipe``, or an AdapterFile from
    :func:`read`) into ``pipe`` as ``name`` and make it the active one. Returns the adapter as
    loaded: a plain PEFT adapter then names the component it went into. Atomic: anything that
    does not fit raises before the pipeline changes."""
    if not isinstance(adapter, AdapterFile):
        adapter = read(adapter, pipe, component)
    loaded = load_adapter(pipe, adapter, name, component)
    mods = components(pipe)  # a plain PEFT adapter names no class: it is the one it went into
    parts = {n: _with_class(part, mods.get(n)) for n, part in loaded.components.items()}
    unplaced = loaded.unplaced and _with_class(loaded.unplaced, mods.get(""))
    return AdapterFile(parts, loaded.metadata, unplaced, adapter.source, adapter.kind, adapter.size_bytes)


def _with_class(part: ComponentAdapter, module: Any) -> ComponentAdapter:
    """``part``, naming the class of the ``module`` it went into if the file named none."""
    if part.model_class is not None or module is None:
        return part
    return ComponentAdapter(part.config, part.tensors, type(module).__name__)


# -- describing ------------------------------------------------------------------------------------
def describe_adapter(adapter: AdapterFile) -> dict[str, Any]:
    """Method, components, layers, parameters, size and metadata of a read adapter (an unplaced
    part, a plain PEFT adapter's, is listed as ``model``)."""
    named = {**adapter.components, **({"model": adapter.unplaced} if adapter.unplaced is not None else {})}
    methods = sorted({part.config.method for part in named.values()})
    return {
        "path": adapter.source,
        "format": adapter.kind,
        "size_bytes": adapter.size_bytes,
        "method": str(adapter.metadata.get("method") or ",".join(methods)),
        "metadata": dict(adapter.metadata),
        "components": {
            n: {
                "class": part.model_class,
                "method": part.config.method,
                "layers": len({k.rsplit(".", 1)[0] for k in part.tensors if k.startswith("base_model.model.")}),
                "parameters": sum(v.numel() for v in part.tensors.values()),
                "config": part.config.to_dict(),
            }
            for n, part in named.items()
        },
        "notes": [],
    }


def _split_key(key: str) -> tuple[str, str]:
    """``<module name>.<tensor>`` -> (module name, tensor suffix), known multi-part suffixes first."""
    for suffix in sorted((*lycoris.OFT_KEYS, *lycoris.OTHER_KEYS), key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, suffix = key.rpartition(".")
    return module, suffix


def _component_of(module: str) -> str:
    for prefix, component in lycoris.PREFIXES:
        if module.startswith(prefix):
            return component or "denoiser"
    return module.partition(".")[0] or "?"


def describe_community(path: PathLike) -> dict[str, Any]:
    """A LyCORIS / kohya / ComfyUI file described without its model: per component (from the
    key prefixes) the algorithms, module count, parameters and block sizes; ``notes`` say what
    only the model can tell and whether diffadapt can load it at all."""
    path = Path(path)
    meta, shapes = _header(path)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        module, suffix = _split_key(key)
        groups.setdefault(module, {})[suffix] = shape
    parts: dict[str, dict[str, Any]] = {}
    unsupported: Counter = Counter()
    rotations = any("oft_blocks" in g for g in groups.values())
    beside = getattr(lycoris, "ZERO_OK", ())  # ComfyUI's trainer: bias/norm diffs beside the rotations
    zero_only = 0
    for module, tensors in groups.items():
        blocks = tensors.get("oft_blocks")
        if blocks is not None:
            method = "boft" if len(blocks) == 4 or "rescale" in tensors else "oft"
        elif rotations and beside and set(tensors) <= set(beside):
            method = "diff"
            zero_only += 1
        else:
            kinds = [lycoris.OTHER_KEYS.get(s) for s in tensors if s in lycoris.OTHER_KEYS]
            method = kinds[0] if kinds else "unknown"
            unsupported[method] += 1
        part = parts.setdefault(_component_of(module), {"class": None, "methods": Counter(), "layers": 0,
                                                        "parameters": 0, "block_sizes": set()})
        part["methods"][method] += 1
        part["layers"] += 1
        part["parameters"] += sum(_numel(s) for s in tensors.values())
        if blocks is not None and len(blocks) in (3, 4):
            part["block_sizes"].add(blocks[-1])
    components = {
        n: {
            "class": None,
            "method": ",".join(sorted(p["methods"])),
            "layers": p["layers"],
            "parameters": p["parameters"],
            "config": {"block_size": sorted(p["block_sizes"])} if p["block_sizes"] else {},
        }
        for n, p in parts.items()
    }
    notes = ["module names not resolved: without the base model (--model) diffadapt cannot tell which layers "
             "they are or whether the file fits that model"]
    if zero_only:
        notes.append(f"{zero_only} modules carry diff/diff_b tensors beside the rotations: diffadapt imports the file "
                     "only if they are all zero (no diffadapt adapter changes biases or norms)")
    if unsupported:
        kinds = ", ".join(f"{k} ({n} modules)" for k, n in unsupported.items())
        notes.append(f"holds {kinds}: diffadapt loads LyCORIS/kohya OFT and BOFT (oft_blocks) only; "
                     "load LoRA files with diffusers' pipe.load_lora_weights")
    methods = sorted({m for p in parts.values() for m in p["methods"]})
    return {
        "path": str(path),
        "format": "community",
        "size_bytes": size_of(path),
        "method": ",".join(methods),
        "metadata": dict(meta),
        "components": components,
        "notes": notes,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe(path: PathLike, pipe: Any = None, component: Optional[str] = None) -> dict[str, Any]:
    """What ``diffadapt info`` prints, for a file or folder of any supported format.

    With ``pipe`` (the base pipeline or model) the adapter is also loaded there, under a
    temporary name removed again, and ``fits`` says whether it does (``notes`` say why not); a
    community file's module names are then resolved. Without, a community file is described from
    its tensor names and shapes (:func:`describe_community`) and ``fits`` is None."""
    kind = peek(path)
    if pipe is None:
        info = describe_community(path) if kind == "community" else describe_adapter(read(path, None, component))
        info["fits"] = None
        return info
    try:
        adapter = read(path, pipe, component)
    except UnreadableAdapter:
        raise
    except CheckpointError as exc:  # a community file whose names or shapes do not fit this model
        info = describe_community(path)
        info["notes"] = [f"does not fit this {type(pipe).__name__}: {' '.join(str(exc).split())}"]
        info["fits"] = False
        return info
    name = "diffadapt_info"
    try:
        loaded = load(pipe, adapter, name, component)
    except Exception as exc:  # the whole check of load_adapter: architecture, layers, shapes
        info = describe_adapter(adapter)
        info["notes"].append(f"does not fit this {type(pipe).__name__}: {' '.join(str(exc).split())}")
        info["fits"] = False
        return info
    from diffadapt.pipeline import delete_adapter

    delete_adapter(pipe, name)
    info = describe_adapter(loaded)
    info["fits"] = True
    return info
