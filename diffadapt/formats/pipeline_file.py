"""diffadapt's pipeline adapter artifact on disk, two interchangeable forms, and the reader that
takes every supported file (:func:`read_pipeline_adapter`):

* a folder: ``diffadapt_adapter.json`` (metadata) and one PEFT folder per component
  (``unet/adapter_config.json`` + ``unet/adapter_model.safetensors``, ...), so each component
  stays loadable by PEFT;
* a single ``.safetensors`` file for sharing: keys ``<component>.<PEFT key>``, the metadata
  and every component's config in the safetensors header (``diffadapt``).

Plain PEFT folders (:mod:`diffadapt.checkpoint`) and LyCORIS / kohya / ComfyUI OFT and BOFT files
(:mod:`diffadapt.formats.lycoris`, whose module names resolve against the pipeline they are for)
read into the same :class:`~diffadapt.artifact.PipelineAdapter`.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch

from diffadapt import checkpoint
from diffadapt.artifact import ComponentAdapter, PipelineAdapter
from diffadapt.checkpoint import CheckpointError
from diffadapt.formats import lycoris
from diffadapt.patterns import shorten

META_NAME = "diffadapt_adapter.json"
FORMAT = "diffadapt.pipeline-adapter"

_COMPONENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_component(name: object, source: object) -> str:
    """A component name from a file: an identifier (``unet``, ``text_encoder_2``), never a path."""
    if not isinstance(name, str) or len(name) > 100 or not _COMPONENT.fullmatch(name):
        raise CheckpointError(
            f"{source} names component {shorten(name, 60)}: component names are identifiers "
            "(letters, digits, '_'), never paths; the file is damaged or hostile."
        )
    return name


def write_pipeline_adapter(adapter: PipelineAdapter, path: Union[str, os.PathLike]) -> Path:
    """Write a pipeline adapter as one ``.safetensors`` file or as a folder of PEFT folders
    (both atomically: a temporary sibling renamed into place once complete)."""
    path = Path(path)
    if adapter.unplaced is not None:
        raise ValueError("Name the component of a single-model adapter (e.g. 'unet', adapter.placed('unet')) before writing it.")
    if not adapter.components:
        raise ValueError("The adapter has no components; there is nothing to write.")
    for n in adapter.components:
        check_component(n, "the adapter")
    if path.suffix == ".safetensors":
        tensors = {f"{n}.{k}": v for n, part in adapter.components.items() for k, v in part.tensors.items()}
        header = {
            "format": FORMAT,
            "metadata": adapter.metadata,
            "components": {
                n: {"class": part.model_class, "config": part.config.to_dict()}
                for n, part in adapter.components.items()
            },
        }
        return checkpoint.save_file_atomic(tensors, path, metadata={"format": "pt", "diffadapt": json.dumps(header)})
    return write_pipeline_folder(adapter, path)


def _listed_components(folder: Path) -> list[str]:
    """Component folders the manifest of an existing pipeline folder lists (for replacing them)."""
    try:
        header = json.loads((folder / META_NAME).read_text())
        return [n for n in header["components"] if isinstance(n, str) and _COMPONENT.fullmatch(n)]
    except Exception:  # no manifest or not ours: nothing to remove
        return []


def write_pipeline_folder(adapter: PipelineAdapter, path: Union[str, os.PathLike]) -> Path:
    """A folder of PEFT folders, one per component, and the manifest ``diffadapt_adapter.json``
    written last, carrying a write id that every component's weights carry too (the reader
    refuses parts of different writes)."""
    path = Path(path)
    for n in adapter.components:
        check_component(n, "the adapter")
    write_id = uuid.uuid4().hex
    base_model = adapter.metadata.get("base_model")
    for part in adapter.components.values():
        checkpoint.peft_config_dict(part.config, base_model)  # refuses what PEFT cannot express, before writing

    def write(tmp: Path) -> None:
        for n, part in adapter.components.items():
            checkpoint._write_peft_files(tmp / n, part.config, part.tensors, base_model, write_id)
        manifest = {"format": FORMAT, "metadata": adapter.metadata, "components": adapter.classes, "write_id": write_id}
        with open(tmp / META_NAME, "w") as f:
            json.dump(manifest, f, indent=2)

    return checkpoint.write_folder_atomic(
        path,
        write,
        ours=lambda e: e.name == META_NAME and e.is_file() or checkpoint.is_adapter_folder(e),
        manifest=META_NAME,
        stale=_listed_components,
    )


def _listed(header: dict, where: Path) -> tuple[dict, dict]:
    """``(components, metadata)`` of a manifest / file header, checked (format, types, not empty)."""
    if header.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{where}: format {shorten(header.get('format'), 40)} is not {FORMAT}.")
    listed = checkpoint.expect(header.get("components"), dict, where, "components")
    metadata = checkpoint.expect(header.get("metadata", {}), dict, where, "metadata")
    if not listed:
        raise CheckpointError(f"{where} lists no components; there is no adapter to load.")
    return listed, metadata


def _read_folder(path: Path) -> PipelineAdapter:
    meta = path / META_NAME
    checkpoint.check_inside(path, meta, "manifest")
    header = checkpoint.expect(checkpoint.read_json(meta), dict, meta, "the manifest")
    listed, metadata = _listed(header, meta)
    for n, cls in listed.items():
        check_component(n, meta)
        checkpoint.expect(cls, (str, type(None)), meta, f"components[{n!r}]")
    write_id = header.get("write_id")
    parts = {}
    for n in listed:
        sub = path / n
        checkpoint.check_inside(path, sub, f"component {n!r}")
        if not sub.is_dir():
            raise CheckpointError(f"{meta} lists component {n!r} but {path} has no {n}/ folder; the folder is incomplete.")
        parts[n] = ComponentAdapter(*checkpoint.read_adapter(sub, root=path), listed[n])
        if write_id is not None:
            theirs = checkpoint.read_safetensors_metadata(sub / checkpoint.WEIGHTS_NAME).get(checkpoint.WRITE_ID)
            if theirs != write_id:
                raise CheckpointError(
                    f"{path}: component {n!r} was written by another save than {META_NAME} (write id "
                    f"{shorten(theirs, 40)} vs {shorten(write_id, 40)}); the folder mixes two saves. Save the adapter again."
                )
    if write_id is not None:  # parts of this kind of write that the manifest does not list
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in listed):
            weights = sub / checkpoint.WEIGHTS_NAME
            if weights.is_file() and not weights.is_symlink():
                if checkpoint.WRITE_ID in checkpoint.read_safetensors_metadata(weights):
                    raise CheckpointError(
                        f"{path}: sub-folder {sub.name!r} holds a diffadapt component that {META_NAME} does not list "
                        "(left from another save); the folder's parts disagree. Save the adapter again."
                    )
    return PipelineAdapter(parts, metadata)


def _read_file(path: Path, raw: object, tensors: dict[str, torch.Tensor]) -> PipelineAdapter:
    header = checkpoint.expect(checkpoint.parse_json(raw, path, "diffadapt header"), dict, path, "the diffadapt header")
    listed, metadata = _listed(header, path)
    parts = {}
    for n, info in listed.items():
        check_component(n, path)
        checkpoint.expect(info, dict, path, f"components[{n!r}]")
        cls = checkpoint.expect(info.get("class"), (str, type(None)), path, f"components[{n!r}].class")
        config = checkpoint.config_from_dict(info.get("config"), path, f"components[{n!r}].config")
        prefix = n + "."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not part:
            raise CheckpointError(f"{path}: component {n!r} has no tensors ({prefix}*); the file is incomplete.")
        parts[n] = ComponentAdapter(config, part, cls)
    stray = [k for k in tensors if k.split(".", 1)[0] not in listed]
    if stray:
        raise CheckpointError(
            f"{path}: {len(stray)} tensors belong to no listed component ({', '.join(shorten(k) for k in stray[:3])})."
        )
    return PipelineAdapter(parts, metadata)


def read_pipeline_adapter(
    path: Union[str, os.PathLike], component: Optional[str] = None, target: Any = None
) -> PipelineAdapter:
    """Read a diffadapt pipeline folder or file, or a plain PEFT folder (for ``component``), or a
    LyCORIS / kohya / ComfyUI OFT/BOFT file, whose names resolve against ``target`` (the pipeline
    or model it is for; ``component`` then names the component of ``lycoris_`` keys).

    Whatever the file holds, a malformed or hostile one raises one-line CheckpointError naming
    the file and the field (component names are identifiers; a folder's parts never resolve
    outside it and must come from one save)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No adapter at {path}.")
    if component:
        check_component(component, "component=")
    if path.is_dir() and (path / META_NAME).is_file():
        return _read_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        header_meta, tensors = checkpoint.read_safetensors(path)
        raw = header_meta.get("diffadapt")
        if raw is not None:
            return _read_file(path, raw, tensors)
        if lycoris.is_community_file(tensors):
            with checkpoint.refusing(path):
                return lycoris.read_lycoris(path, target, component, tensors, header_meta)
    part = ComponentAdapter(*checkpoint.read_adapter(path))  # a single PEFT adapter
    if component:
        return PipelineAdapter({component: part}, {"method": part.config.method})
    return PipelineAdapter({}, {"method": part.config.method}, unplaced=part)
