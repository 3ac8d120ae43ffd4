"""The ControlNet script on a pipeline whose VAE does not downsample by 8 (the embedded default:
4): a ControlNet made from the UNet gets a conditioning embedding that meets the latents at their
size, a given ControlNet made for another VAE is refused in one line, and a short run on the
embedded default trains and saves (it crashed: "The size of tensor a (16) must match the size of
tensor b (8)")."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tests import tiny_pipelines as tp

ROOT = Path(__file__).resolve().parents[1]
CONTROLNET = ROOT / "train_scripts" / "train_controlnet.py"


@pytest.fixture(scope="module")
def script():
    """train_scripts/train_controlnet.py as a module (sys.path and its sibling modules restored after)."""
    path, had = sys.path[:], set(sys.modules)
    spec = importlib.util.spec_from_file_location("train_controlnet_under_test", CONTROLNET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    for name in set(sys.modules) - had:
        if name in ("common", "sd_parts", "training_loop", "atomic_io", "families", "control_data"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def embedded():
    from diffusers import StableDiffusionPipeline

    import diffadapt as da

    return StableDiffusionPipeline.from_pretrained(da.default_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)


def args_for(script, **kw):
    return type("Args", (), {"controlnet_model_name_or_path": None, "revision": None,
                             "pretrained_model_name_or_path": "base", **kw})()


@pytest.mark.parametrize("factor, widths", [(1, (256,)), (2, (16, 256)), (4, (16, 32, 256)), (8, (16, 32, 96, 256)),
                                            (16, (16, 32, 96, 256, 256))])
def test_conditioning_widths_follow_the_vae_factor(script, factor, widths):
    assert script.conditioning_channels(factor) == widths  # 8: diffusers' default, unchanged
    with pytest.raises(script.UsageError, match="VAE scale factor is 6; a ControlNet needs a power of two"):
        script.conditioning_channels(6)


@pytest.mark.parametrize("build", ["embedded", "sd"])
def test_new_controlnet_meets_the_latents(script, embedded, build):
    """The conditioning image at the pipeline's resolution comes out at the latents' size, where
    the UNet adds it (both the embedded factor-4 VAE and a factor-8 one)."""
    pipe = embedded if build == "embedded" else tp.build_sd(0)
    controlnet, source = script.load_controlnet(args_for(script), pipe)
    assert source is None and script.embedding_factor(controlnet) == pipe.vae_scale_factor
    size = 8 * pipe.vae_scale_factor
    image = torch.rand(1, 3, size, size)
    with torch.no_grad():
        latents = pipe.vae.encode(image * 2 - 1).latent_dist.mean
        embedded_cond = controlnet.controlnet_cond_embedding(image)
    assert embedded_cond.shape[-2:] == latents.shape[-2:] == (8, 8)


def test_a_controlnet_for_another_vae_is_refused(script, embedded, tmp_path):
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(embedded.unet).save_pretrained(tmp_path / "cn8")  # diffusers' default: 8x
    with pytest.raises(script.UsageError) as err:
        script.load_controlnet(args_for(script, controlnet_model_name_or_path=str(tmp_path / "cn8")), embedded)
    assert "downsamples by 8" in str(err.value) and "VAE by 4" in str(err.value) and "\n" not in str(err.value)


def test_short_run_on_the_embedded_default(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "conditioning_images").mkdir()
    rows = []
    for i in range(6):
        box = (4 + 2 * i, 6, 20 + 2 * i, 22)
        scene = Image.new("RGB", (32, 32), (30, 140, 30))
        ImageDraw.Draw(scene).ellipse(box, fill=(170, 40, 190))
        outline = Image.new("RGB", (32, 32))
        ImageDraw.Draw(outline).ellipse(box, outline=(255, 255, 255))
        scene.save(data / "images" / f"{i}.png")
        outline.save(data / "conditioning_images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "conditioning_image": f"conditioning_images/{i}.png",
                     "text": "a purple circle on a green background"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(CONTROLNET), "--train_data_dir", str(data), "--method", "oft",
                           "--adapt", "controlnet", "--max_train_steps", "3", "--output_dir", str(out),
                           "--report_to", "none"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "diffadapt_adapter.json").read_text())
    assert set(meta["components"]) == {"controlnet"} and meta["metadata"]["method"] == "oft"
    config = json.loads((out / "controlnet_model" / "config.json").read_text())
    assert config["conditioning_embedding_out_channels"] == [16, 32, 256]  # the embedded VAE: 4x
