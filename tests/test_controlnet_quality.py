"""benchmarks/quality.py --controlnet: the mask-following metric (foreground against the image's own
background colour, IoU and centroid error against the conditioning mask), its paired summary, the
held-out masks (never a training scene) and the mask | base | adapter off | adapted grid."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffadapt.embedded import world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    """benchmarks/quality.py as a module (sys.path and the train_scripts modules it imports restored after)."""
    path, had = sys.path[:], set(sys.modules)
    spec = importlib.util.spec_from_file_location("quality_under_test", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    for name in set(sys.modules) - had:
        if name in ("common", "sd_parts", "training_loop", "atomic_io", "families", "control_data", "train_controlnet"):
            sys.modules.pop(name, None)


def scene(**kw) -> world.Scene:
    base = world.Scene("square", "red", "large", "plain", "blue", 0.5, 0.5, 10.0)
    return replace(base, **kw)


def mask_of(quality, s: world.Scene) -> Image.Image:
    import control_data  # on sys.path through the fixture

    return control_data.conditioning_mask(s, 64)


def painted(mask: Image.Image, object_rgb, background_rgb) -> Image.Image:
    """The mask's object exactly, in one colour on another."""
    m = np.asarray(mask.convert("L")) > 127
    px = np.where(m[..., None], np.array(object_rgb), np.array(background_rgb)).astype(np.uint8)
    return Image.fromarray(px)


def test_the_mask_object_on_its_background_scores_one_and_an_empty_image_zero(quality):
    mask = mask_of(quality, scene())
    exact = quality.follow_scores(painted(mask, world.COLORS["red"], world.COLORS["blue"]), mask)
    assert exact == {"iou": 1.0, "centroid_error": 0.0}
    empty = quality.follow_scores(Image.new("RGB", (64, 64), world.COLORS["blue"]), mask)
    assert empty == {"iou": 0.0, "centroid_error": 1.0}
    # the background is read from the image, not assumed: the same object on white, or the mask itself
    assert quality.follow_scores(painted(mask, world.COLORS["green"], world.COLORS["white"]), mask)["iou"] == 1.0
    assert quality.follow_scores(mask, mask)["iou"] > 0.9  # its grey anti-aliased edge reads as object too


def test_an_object_elsewhere_or_of_another_size_scores_low(quality):
    mask = mask_of(quality, scene(size="small", x=0.25, y=0.25))
    moved = mask_of(quality, scene(size="small", x=0.75, y=0.7))
    far = quality.follow_scores(painted(moved, world.COLORS["red"], world.COLORS["blue"]), mask)
    assert far["iou"] == 0.0 and abs(far["centroid_error"] - np.hypot(0.5, 0.45)) < 0.03
    bigger = mask_of(quality, scene(size="large", x=0.4, y=0.4))
    half = quality.follow_scores(painted(bigger, world.COLORS["red"], world.COLORS["blue"]), mask)
    assert 0.05 < half["iou"] < 0.5


def test_rendered_scenes_score_high_even_for_the_closest_colours(quality):
    """The world's own renders (anti-aliased, textured) on their masks: the metric's ceiling; orange
    on yellow, the closest pair of colours (RGB distance 82), is still found (a mean-difference rule
    at 40 read nothing there)."""
    cases = [scene(), scene(color="orange", background="yellow"), scene(color="yellow", background="orange"),
             scene(color="purple", background="blue", texture="dotted"), scene(shape="star", size="small", x=0.3),
             scene(shape="cross", color="white", background="black", texture="striped", x=0.6, y=0.35)]
    for s in cases:
        got = quality.follow_scores(world.render(s, 64), mask_of(quality, s))
        assert got["iou"] > 0.8 and got["centroid_error"] < 0.02, (s, got)


def test_stripes_of_the_background_colour_do_not_punch_holes(quality):
    s = scene(color="yellow", background="black", texture="striped")  # black stripes on a black background
    image, mask = world.render(s, 64), mask_of(quality, s)
    fg = quality.foreground(image)
    m = quality.mask_pixels(mask)
    assert (fg & m).sum() / (fg | m).sum() > 0.8
    raw = np.linalg.norm(np.asarray(image, dtype=np.float32) - np.array(world.COLORS["black"]), axis=-1) > 40
    assert (fg & m).sum() > (raw & m).sum()  # the closing filled what the stripes took


def test_summary_and_paired_gain(quality):
    a = [{"iou": 0.8, "centroid_error": 0.01}, {"iou": 0.6, "centroid_error": 0.03}, {"iou": 0.2, "centroid_error": 0.2}]
    b = [{"iou": 0.4, "centroid_error": 0.1}, {"iou": 0.6, "centroid_error": 0.05}, {"iou": 0.3, "centroid_error": 0.3}]
    s = quality.follow_summary(a)
    assert s["images"] == 3 and abs(s["iou_mean"] - 1.6 / 3) < 1e-9 and abs(s["hit_rate"] - 2 / 3) < 1e-9
    assert abs(s["iou_std"] - np.std([0.8, 0.6, 0.2])) < 1e-9
    g = quality.paired(a, b)
    assert abs(g["iou_gain_mean"] - 0.1) < 1e-9 and g["adapted_higher"] == 1 and g["adapted_lower"] == 1
    table = quality.controlnet_table({"base": quality.follow_summary(b), "adapted": s}, {"adapted − base": g})
    assert "| adapted | 0.533 ± " in table and "adapted − base IoU, paired per image: +0.100" in table
    assert "higher on 1, lower on 1 of 3 images" in table


def test_held_out_masks_are_not_training_scenes(quality, tmp_path):
    import control_data
    import train_controlnet

    out = tmp_path / "controlnet"
    control_data.render_control_data(out / train_controlnet.DATA_FOLDER, train_controlnet.EMBEDDED_SCENES,
                                     train_controlnet.EMBEDDED_HELD_OUT, seed=3)
    held = quality.held_out_masks(out, 5, seed=3)
    trained = [json.loads(r)["scene"] for r in (out / "control_data" / "metadata.jsonl").read_text().splitlines()]
    assert len(held) == 5 and not [s for _, _, s in held if asdict(s) in trained]
    first = control_data.render_control_data(tmp_path / "again", train_controlnet.EMBEDDED_SCENES,
                                             train_controlnet.EMBEDDED_HELD_OUT, seed=3)
    assert [s for _, _, s in first] == [s for _, _, s in held[:train_controlnet.EMBEDDED_HELD_OUT]]  # the grid's rows first
    for text, mask, s in held:
        assert text == world.caption(s) and np.array_equal(np.asarray(mask), np.asarray(mask_of(quality, s)))
    with pytest.raises(SystemExit, match="not the embedded default's for seed 4"):
        quality.held_out_masks(out, 5, seed=4)  # another seed's held-out scenes: this folder is not its training set


def test_grid_columns(quality, tmp_path):
    sd_parts = sys.modules["sd_parts"]
    s = [scene(), scene(x=0.3)]
    held = [(world.caption(x), mask_of(quality, x), x) for x in s]
    colours = ("red", "green", "yellow")
    samples = [[Image.new("RGB", (64, 64), world.COLORS[c])] * 2 for c in colours]
    grid = quality.controlnet_grid(tmp_path / "g.png", held, samples, seed=7)
    assert (tmp_path / "g.png").is_file() and len(quality.GRID_COLUMNS) == 4
    px = np.asarray(grid.convert("RGB"))
    for row in range(2):
        for col, want in enumerate([None, *colours]):
            left, top = sd_parts.grid_cell(row, col, 96, label_width=260, per_group=1, columns=4)
            cell = px[top:top + 96, left:left + 96]
            if want is None:
                expected = np.asarray(held[row][1].convert("RGB").resize((96, 96), Image.NEAREST))
                assert np.array_equal(cell, expected)
            else:
                assert (cell == np.array(world.COLORS[want])).all()
