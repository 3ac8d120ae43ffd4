"""The procedural world, its offline tokenizer, and the shipped base pipeline."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import diffadapt
from diffadapt.embedded import world
from diffadapt.embedded.tokenizer import build_tokenizer

BASE_MODEL = Path(diffadapt.__file__).parent / "embedded" / "assets" / "base_model"


def _pixels(images):
    return [im.tobytes() for im in images]


def test_dataset_is_deterministic_and_varied():
    a, b, c = world.dataset(6, seed=3), world.dataset(6, seed=3), world.dataset(6, seed=4)
    assert _pixels(x[0] for x in a) == _pixels(x[0] for x in b)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert _pixels(x[0] for x in a) != _pixels(x[0] for x in c)
    assert all(x[0].size == (64, 64) and x[0].mode == "RGB" for x in a)
    rng = random.Random(0)
    scenes = [world.sample_scene(rng) for _ in range(400)]
    for attr, values in [("shape", world.SHAPES), ("color", world.COLORS), ("size", world.SIZES),
                         ("texture", world.TEXTURES), ("background", world.COLORS)]:
        assert {getattr(s, attr) for s in scenes} == set(values), attr
    assert len({s.region for s in scenes}) == len(world.REGIONS)
    assert world.render(scenes[0], 32).size == (32, 32)


def test_subject_is_held_out_and_drawn_in_poses():
    rng = random.Random(1)
    assert not any(world.is_subject(world.sample_scene(rng)) for _ in range(3000))
    assert not any(world.is_subject(world.sample_scene(rng, shape="hexagon", color="purple")) for _ in range(200))
    with pytest.raises(ValueError):
        world.sample_scene(rng, **world.SUBJECT)
    imgs = world.subject_images(4, seed=0)
    assert _pixels(imgs) == _pixels(world.subject_images(4, seed=0))
    assert len(set(_pixels(imgs))) == 4  # different poses
    assert all(world.color_fraction(im, "purple") > 0.02 for im in imgs)
    assert "sks" in world.INSTANCE_PROMPT and "hexagon" in world.CLASS_PROMPT
    classes = world.class_images(5, seed=0)
    assert _pixels(im for im, _ in classes) == _pixels(im for im, _ in world.class_images(5, seed=0))
    assert len(set(_pixels(im for im, _ in classes))) == 5  # five different scenes
    assert world.class_images(1, seed=0, size=32)[0][0].size == (32, 32)
    for im, cap in classes:
        assert "hexagon" in cap and not ("purple" in cap.split(" on ")[0] and "striped" in cap)
        assert im.size == (64, 64) and im.mode == "RGB"
        obj, bg = cap.split(" on ")
        (color,) = [w for w in obj.split() if w in world.COLORS]
        (background,) = [w for w in bg.split() if w in world.COLORS]
        assert world.color_fraction(im, color) > 0.02, cap  # the image shows what its caption says
        assert world.color_fraction(im, background) > 0.5, cap


def test_captions_state_the_scene():
    rng = random.Random(2)
    for _ in range(200):
        s = world.sample_scene(rng)
        full = world.caption(s)
        obj, bg = full.split(" on ")
        assert {s.shape, s.color, s.size} <= set(obj.split())
        assert (s.texture in obj.split()) == (s.texture != "plain")
        assert bg.startswith(f"a {s.background} background") or bg.startswith(f"an {s.background} background")
        assert full.endswith(s.region)
        para = world.caption(s, rng).split(" on ")[0].split()
        assert s.shape in para
        assert not (set(para) & set(world.COLORS)) - {s.color}
        assert all(w in world.WORDS for w in world.caption(s, rng).split())
    red = world.render(world.Scene("square", "red", "large", "plain", "blue", 0.5, 0.5, 0.0), 64)
    assert red.getpixel((32, 32)) == world.COLORS["red"] and red.getpixel((1, 1)) == world.COLORS["blue"]


def test_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    build_tokenizer(str(tmp_path / "tok"))
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.model_max_length == 77
    for w in world.WORDS:  # every world word, the trigger included, is one known token
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
    text = "a photo of sks hexagon on an orange background"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == len(text.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    odd = tok("a zebra, 42 ünïcode!").input_ids  # unknown words fall back to byte symbols
    assert tok.unk_token_id not in odd[1:-1] and len(odd) > 4
    padded = tok(["", text], padding="max_length", max_length=77, truncation=True).input_ids
    assert all(len(p) == 77 for p in padded)
    tok.save_pretrained(str(tmp_path / "saved"))
    assert CLIPTokenizer.from_pretrained(str(tmp_path / "saved"))(text).input_ids == ids


@pytest.mark.skipif(not (BASE_MODEL / "model_index.json").exists(),
                    reason="diffadapt/embedded/assets/base_model not built yet: run train_scripts/pretrain_base.py")
def test_shipped_pipeline_loads_offline_and_generates(monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    size = sum(f.stat().st_size for f in BASE_MODEL.rglob("*") if f.is_file())
    assert size < 32 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_MODEL))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    assert len(pipe.tokenizer("sks", add_special_tokens=False).input_ids) == 1
    out = pipe(world.INSTANCE_PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.size == (64, 64)
    assert len(set(image.getdata())) > 1


def _nearest_color(pixels) -> str:
    """World colour name nearest (L2) to the mean of an (N, 3) array of RGB pixels."""
    import numpy as np

    mean = np.asarray(pixels, dtype=np.float32).reshape(-1, 3).mean(0)
    return min(world.COLORS, key=lambda c: float(((mean - np.array(world.COLORS[c])) ** 2).sum()))


@pytest.mark.skipif(not (BASE_MODEL / "model_index.json").exists(), reason="diffadapt/embedded/assets/base_model not built yet")
def test_shipped_pipeline_draws_the_caption_colours():
    """The embedded model follows its captions: background colour (image border) and the colour
    of a large centred object (image centre) are the named ones, for several seeds."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_MODEL))
    pipe.set_progress_bar_config(disable=True)
    cases = [("red", "blue"), ("yellow", "black"), ("white", "green"), ("purple", "orange"), ("blue", "yellow")]
    prompts = [f"a large {obj} circle on {'an' if bg == 'orange' else 'a'} {bg} background" for obj, bg in cases]
    gens = [torch.Generator().manual_seed(seed) for _ in prompts for seed in (0, 1)]
    images = pipe([p for p in prompts for _ in (0, 1)], generator=gens, num_inference_steps=20).images
    for k, image in enumerate(images):
        obj, bg = cases[k // 2]
        a = np.asarray(image)
        border = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3), a[:, :4].reshape(-1, 3), a[:, -4:].reshape(-1, 3)])
        assert _nearest_color(border) == bg, (prompts[k // 2], k % 2, _nearest_color(border))
        assert _nearest_color(a[26:38, 26:38]) == obj, (prompts[k // 2], k % 2, _nearest_color(a[26:38, 26:38]))
