"""Writing folders and files so that a kill at any moment leaves either the old or the new
version, never a half-written one: write into a temporary sibling, flush it to disk, rename.

* ``fsync_tree`` / ``replace_dir``: a finished folder replaces another in two renames;
* ``write_text_atomic``: one file through a temporary sibling and ``os.replace``;
* ``publish_artifact``: the trained adapter (a diffadapt pipeline folder: one PEFT folder per
  component and ``diffadapt_adapter.json``, plus e.g. ``controlnet_model/``) is written into
  ``<output_dir>/.artifact.tmp`` and its entries are then moved into ``output_dir``; the marker
  file ``diffadapt_adapter.json`` is removed first and put back last, so a reader finds either
  a complete artifact or none (``diffadapt.load_adapter`` refuses a folder without it).

No third-party imports: used before torch is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

ARTIFACT_MARKER = "diffadapt_adapter.json"  # diffadapt.pipeline.META_NAME
ARTIFACT_TMP = ".artifact.tmp"


def fsync_tree(folder) -> None:
    """Flush every file under ``folder`` and the folders themselves (a crash of the machine
    after the rename must not find empty files under the new name)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path) -> None:
    """Remove a file or folder if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(src, dst) -> None:
    """Put the finished folder ``src`` at ``dst``. An existing ``dst`` is moved aside to
    ``<dst>.old`` first and removed after: at every moment ``dst`` is absent, old or new."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(dst.name + ".old")
    remove(old)
    if dst.exists():
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    remove(old)


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_artifact(output_dir, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a fresh temporary folder inside ``output_dir``, then move what
    it wrote into ``output_dir`` (see the module docstring). Components of an earlier artifact
    in the same folder that the new one does not have are removed with it."""
    out = Path(output_dir)
    tmp = out / ARTIFACT_TMP
    remove(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    marker = out / ARTIFACT_MARKER
    stale = []
    if marker.is_file():
        try:
            stale = list(json.loads(marker.read_text()).get("components", {}))
        except (OSError, ValueError, AttributeError):
            stale = []
        marker.unlink()
        fsync_dir(out)
    entries = sorted(p.name for p in tmp.iterdir() if p.name != ARTIFACT_MARKER)
    for name in entries:
        if (tmp / name).is_dir():
            replace_dir(tmp / name, out / name)
        else:
            os.replace(tmp / name, out / name)
    for name in stale:
        if name not in entries and (out / name).is_dir() and os.sep not in name and name not in ("", ".", ".."):
            shutil.rmtree(out / name)
    if (tmp / ARTIFACT_MARKER).exists():
        os.replace(tmp / ARTIFACT_MARKER, marker)
    fsync_dir(out)
    remove(tmp)
