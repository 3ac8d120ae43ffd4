"""The ControlNet script's offline default: with no --train_data_dir on the embedded model, a
dataset rendered from the shape world (the object's filled mask -> the scene, in the spirit of
fill50k) in the documented layout, a short run, and before_after.png (conditioning image, the
base model's image, strength 0, strength 1); with no --train_data_dir on another model, the one-line refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from diffadapt.embedded import world
from tests import tiny_pipelines as tp
from tests.test_controlnet_scale import CONTROLNET, ROOT, script  # noqa: F401 - the module fixture


def rows_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def object_pixels(scene: world.Scene, image: Image.Image) -> np.ndarray:
    """The oracle: pixels of the rendered scene far from its background colour (the object)."""
    px = np.asarray(image.convert("RGB"), dtype=float)
    return np.abs(px - np.array(world.COLORS[scene.background])).mean(-1) > 40


def box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def test_rendered_dataset_layout_and_masks(script, tmp_path):  # noqa: F811 - the fixture
    held_out = script.render_control_data(tmp_path / "data", 12, 3, seed=5, size=64)
    rows = rows_of(tmp_path / "data")
    assert len(rows) == 12 and len(held_out) == 3
    scenes = []
    for row in rows:
        assert set(row) >= {"image", "conditioning_image", "text"}
        scene = world.Scene(**row["scene"])
        scenes.append(scene)
        image = Image.open(tmp_path / "data" / row["image"])
        cond = np.asarray(Image.open(tmp_path / "data" / row["conditioning_image"]).convert("L"))
        assert image.size == (64, 64) and cond.shape == (64, 64)
        assert row["text"] == world.caption(scene)
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(world.render(scene, 64)))
        assert cond.min() == 0 and cond.max() == 255  # white on black
        mask, obj = cond > 127, object_pixels(scene, image)
        (mx0, my0, mx1, my1), (ox0, oy0, ox1, oy1) = box(mask), box(obj)
        inter = max(0, min(mx1, ox1) - max(mx0, ox0)) * max(0, min(my1, oy1) - max(my0, oy0))
        union = (mx1 - mx0) * (my1 - my0) + (ox1 - ox0) * (oy1 - oy0) - inter
        assert inter / union > 0.7, (row, inter / union)  # the mask marks where the object is
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() / 64 - scene.x) < 0.08 and abs(ys.mean() / 64 - scene.y) < 0.08
        assert not mask[0, 0] and not mask[-1, -1]  # the background stays black
    held_scenes = [s for _, _, s in held_out]
    assert not set(held_scenes) & set(scenes)  # the grid's rows are not training examples
    for text, mask, scene in held_out:
        assert text == world.caption(scene) and mask.size == (64, 64)
    # deterministic from the seed, another seed another dataset
    script.render_control_data(tmp_path / "again", 12, 3, seed=5, size=64)
    assert rows_of(tmp_path / "again") == rows
    script.render_control_data(tmp_path / "other", 12, 3, seed=6, size=64)
    assert rows_of(tmp_path / "other") != rows


def test_short_run_with_no_data_on_the_embedded_default(script, tmp_path):  # noqa: F811 - the fixture
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(CONTROLNET), "--max_train_steps", "2", "--num_inference_steps", "2",
                           "--output_dir", str(out), "--report_to", "none"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout.splitlines()
    assert any(line.startswith("No --train_data_dir: training a fourierft adapter") for line in said), proc.stdout
    assert any("before_after.png" in line and str(out) in line for line in said[-2:]), proc.stdout
    meta = json.loads((out / "diffadapt_adapter.json").read_text())
    assert set(meta["components"]) == {"controlnet"} and meta["metadata"]["method"] == script.EMBEDDED_METHOD
    assert meta["metadata"]["steps"] == 2 and (out / "controlnet_model" / "config.json").is_file()
    rows = rows_of(out / "control_data")
    assert len(rows) == script.EMBEDDED_SCENES
    assert all((out / "control_data" / r[k]).is_file() for r in rows for k in ("image", "conditioning_image"))
    # the grid: held-out rows x (conditioning image, base, strength 0, strength 1), cells of GRID_SIZE
    sd_parts = script.sd_parts
    size, n_rows = script.GRID_SIZE, script.EMBEDDED_HELD_OUT
    grid = Image.open(out / "before_after.png")
    width = sd_parts.grid_cell(0, 3, size, per_group=1, columns=4)[0] + size + 2
    assert grid.size == (width, sd_parts.grid_cell(n_rows, 0, size, per_group=1, columns=4)[1])

    def cell(row, col):
        left, top = sd_parts.grid_cell(row, col, size, per_group=1, columns=4)
        return np.asarray(grid.convert("RGB"))[top:top + size, left:left + size].astype(int)

    # the first column is each row's held-out mask (white on black), not a training one
    mask_cell = cell(0, 0)[..., 0]
    assert mask_cell.min() < 10 and mask_cell.max() > 245
    held = script.render_control_data(tmp_path / "again", script.EMBEDDED_SCENES, n_rows, seed=0)
    expected = np.asarray(held[0][1].convert("L").resize((size, size), Image.NEAREST))
    assert np.abs(mask_cell - expected).mean() < 8
    assert asdict(held[0][2]) not in [r["scene"] for r in rows]
    # the second: the untrained ControlNet (zero convolutions) — the base model's own image, same seed
    from diffusers import StableDiffusionPipeline

    import diffadapt as da

    base = StableDiffusionPipeline.from_pretrained(da.default_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    image = base(prompt=held[0][0], num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    base_image = np.asarray(image.resize((size, size), Image.NEAREST)).astype(int)
    assert np.abs(cell(0, 1) - base_image).mean() < 0.5  # measured: 0 (the ControlNet adds exact zeros)
    assert np.abs(cell(0, 1) - cell(0, 2)).mean() > 0 and np.abs(cell(0, 1) - cell(0, 3)).mean() > 0


def test_no_data_on_another_model_is_refused_in_one_line(tmp_path):
    tp.build_sd(0).save_pretrained(tmp_path / "sd")
    proc = subprocess.run([sys.executable, str(CONTROLNET), "--pretrained_model_name_or_path", str(tmp_path / "sd"),
                           "--method", "oft", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1:] == [
        "error: --train_data_dir is required (a folder with metadata.jsonl, see --help)."]
    assert not (tmp_path / "out" / "control_data").exists()
