"""The pipeline loader, the CLI and the demo app on the newer families' pipelines: SD3.5 (dual
attention), Flux.2, Qwen-Image, Z-Image, Sana, Lumina 2, Chroma and HiDream, each a tiny pipeline
saved with ``save_pretrained`` and loaded back with ``DiffusionPipeline.from_pretrained``; the loader
alone on the video pipeline Wan (2.1 text-to-video: a few frames of latents).

Per family: adapters on the denoiser and on a (non-CLIP) text encoder; save -> load into a fresh
pipeline gives the same latents; ``set_adapters`` switches between two adapters, each giving its
own output; merge == live, unmerge and disable give the base back bit for bit;
``diffadapt generate --model <folder> --adapter <file>`` and the app render an image."""

from __future__ import annotations

import pytest
import torch

import diffadapt as da
from diffadapt import cli
from tests import tiny_pipelines as tp
from tests.test_pipeline import assert_base_restored, base_weights, randomise, rel

# family -> (builder, pipeline class, adapter A {component: (method, kwargs, preset)}, adapter B, A as one file?)
FAMILIES = {
    "sd35": (tp.build_sd35, "StableDiffusion3Pipeline",
             {"transformer": ("boft", dict(boft_block_size=4), "attention+ff"),
              "text_encoder_3": ("hra", dict(r=2), "attention")},
             {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention")}, True),
    "flux2": (tp.build_flux2, "Flux2Pipeline",
              {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention+ff"),
               "text_encoder": ("fourierft", dict(n_frequency=20, init_weights=True), "attention")},
              {"transformer": ("hra", dict(r=2), "attention")}, False),
    "qwenimage": (tp.build_qwenimage, "QwenImagePipeline",
                  {"transformer": ("hra", dict(r=2), "attention+ff"),
                   "text_encoder": ("boft", dict(boft_block_size=4), "attention")},
                  {"transformer": ("frod", dict(sparse_rate=0.05, progressbar=False), "attention")}, True),
    "zimage": (tp.build_zimage, "ZImagePipeline",
               {"transformer": ("fourierft", dict(n_frequency=30, init_weights=True), "attention+ff"),
                "text_encoder": ("oft", dict(oft_block_size=4, r=0), "attention+ff")},
               {"transformer": ("boft", dict(boft_block_size=4), "attention")}, False),
    "sana": (tp.build_sana, "SanaPipeline",
             {"transformer": ("hra", dict(r=2), "attention+ff"),
              "text_encoder": ("hra", dict(r=2), "attention")},
             {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention")}, True),
    "lumina2": (tp.build_lumina2, "Lumina2Pipeline",
                {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention+ff"),
                 "text_encoder": ("fourierft", dict(n_frequency=20, init_weights=True), "attention")},
                {"transformer": ("hra", dict(r=2), "attention+ff")}, False),
    "chroma": (tp.build_chroma, "ChromaPipeline",
               {"transformer": ("hra", dict(r=2), "attention+ff"),
                "text_encoder": ("boft", dict(boft_block_size=4), "attention+ff")},
               {"transformer": ("fourierft", dict(n_frequency=30, init_weights=True), "attention")}, True),
    "hidream": (tp.build_hidream, "HiDreamImagePipeline",
                {"transformer": ("boft", dict(boft_block_size=4), "attention"),
                 "text_encoder_4": ("hra", dict(r=2), "attention+ff")},
                {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention")}, False),
}
VIDEO = {  # the loader here; the CLI and the app on video pipelines: tests/test_video_faces.py
    "wan": (tp.build_wan, "WanPipeline",
            {"transformer": ("boft", dict(boft_block_size=4), "attention+ff"),
             "text_encoder": ("hra", dict(r=2), "attention+ff")},
            {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention")}, True),
    "wan22": (tp.build_wan22, "WanPipeline",  # two denoisers: transformer (high noise), transformer_2 (low)
              {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention"),
               "text_encoder": ("fourierft", dict(n_frequency=20, init_weights=True), "attention"),
               "transformer_2": ("hra", dict(r=2), "attention+ff")},
              # (the low-noise stage runs the last step alone, sigma < 0.01: transformer_2 moves the latents by ~5e-4)
              {"transformer": ("hra", dict(r=2), "attention"),
               "transformer_2": ("boft", dict(boft_block_size=4), "attention")}, False),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tp.one_torch_thread():
        yield


def from_folder(folder):
    """``DiffusionPipeline.from_pretrained`` (the generic loader the CLI and app use), realigned
    so that latents compare bit for bit (see tests/tiny_pipelines.realign_)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return tp.realign_(pipe)


def add(pipe, plan, name, seed):
    for component, (method, kwargs, preset) in plan.items():
        module = getattr(pipe, component)
        assert da.add_adapter(module, da.get_method(method).config_class(**kwargs), name, preset=preset)
        randomise(module, name, seed)


def latents(pipe):
    return tp.generate(pipe, size=32)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """family -> folder written by ``save_pretrained`` (built once per family, on first use)."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(family):
        if family not in made:
            tp.NEW_BUILDERS[family]().save_pretrained(root / family, safe_serialization=True)
            made[family] = root / family
        return made[family]

    return get


def check_load_switch_merge(entry, folder, tmp_path):
    """Adapter A (denoiser + text encoder, + transformer_2) saved, loaded into a fresh pipeline: the same latents;
    a second adapter B; switching, blending, merge == live, unmerge / disable / unload: the base.
    Returns ``(pipe, path of A)``."""
    _, cls, plan_a, plan_b, single_file = entry
    pipe = from_folder(folder)
    assert type(pipe).__name__ == cls
    reference = base_weights(pipe)
    base = latents(pipe)

    add(pipe, plan_a, "A", seed=1)
    live_a = latents(pipe)
    assert rel(live_a, base) > 1e-3, "adapter A must change the latents"
    for other in [c for c in plan_a if c != "transformer"]:  # each other component's adapter matters on its own
        da.disable_adapters(getattr(pipe, other))  # (text encoders; Wan 2.2's transformer_2)
        assert rel(latents(pipe), live_a) > 1e-5, f"the {other} adapter must change the latents"
        da.enable_adapters(getattr(pipe, other))
    path = tmp_path / ("A.safetensors" if single_file else "A")
    da.save_adapter(pipe, path, "A", metadata={"instance_prompt": "a photo of sks"})

    # a fresh pipeline from the same folder, the saved adapter: the same latents
    fresh = from_folder(folder)
    saved = da.load_adapter(fresh, path, "A")
    assert set(saved.components) == set(plan_a)
    assert saved.classes == {c: type(getattr(fresh, c)).__name__ for c in plan_a}
    torch.testing.assert_close(latents(fresh), live_a, rtol=1e-6, atol=1e-7)
    assert set(da.list_adapters(fresh)["A"]) == set(plan_a)
    del fresh

    # a second adapter; switching gives each adapter's own latents
    add(pipe, plan_b, "B", seed=2)
    da.set_adapters(pipe, ["B"])  # B alone: the text encoder (A only) runs no adapter
    live_b = latents(pipe)
    assert rel(live_b, live_a) > 1e-3 and rel(live_b, base) > 1e-3
    for names, expected in [(["A"], live_a), (["B"], live_b), (["A"], live_a)]:
        da.set_adapters(pipe, names)
        torch.testing.assert_close(latents(pipe), expected, rtol=1e-6, atol=1e-7)
    assert dict(da.active_adapters(pipe)) == {"A": 1.0}
    da.set_adapters(pipe, ["A", "B"], [1.0, 0.5])
    blend = latents(pipe)
    assert rel(blend, live_a) > 1e-4 and rel(blend, live_b) > 1e-4

    # merged == live; unmerged and disabled: the base, bit for bit
    da.merge_adapters(pipe)
    assert rel(latents(pipe), blend) < 1e-5
    da.set_adapters(pipe, ["A"])  # merge-switch
    assert rel(latents(pipe), live_a) < 1e-5
    da.unmerge_adapters(pipe)
    assert_base_restored(pipe, reference)
    torch.testing.assert_close(latents(pipe), live_a, rtol=1e-6, atol=1e-7)
    da.disable_adapters(pipe)
    assert torch.equal(latents(pipe), base)
    da.unload(pipe)
    assert_base_restored(pipe, reference)
    return pipe, path


@pytest.mark.parametrize("family", list(VIDEO))
def test_video_load_switch_merge(family, saved_models, tmp_path):
    check_load_switch_merge(VIDEO[family], saved_models(family), tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_switch_merge_and_generate(family, saved_models, tmp_path, capsys):
    _, cls, plan_a, _, _ = FAMILIES[family]
    folder = saved_models(family)
    pipe, path = check_load_switch_merge(FAMILIES[family], folder, tmp_path)

    # the command line: the saved folder, the saved adapter, an image
    out = tmp_path / "out.png"
    capsys.readouterr()
    code = cli.main(["generate", "--model", str(folder), "--adapter", f"{path}:0.8", "--prompt", "a red circle",
                     "--steps", "2", "--height", "32", "--width", "32", "--guidance", "3", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    from PIL import Image

    assert out.is_file() and Image.open(out).mode == "RGB"
    assert f"{path.name}@0.8" in captured.out

    # info --model: the adapter fits this folder's pipeline, each component named with its class
    assert cli.main(["info", str(path), "--model", str(folder)]) == 0
    info = capsys.readouterr().out
    assert f"fits {cls} ({folder}): yes" in info
    for component in plan_a:
        assert f"[{component}] {plan_a[component][0]} on {type(getattr(pipe, component)).__name__}:" in info


@pytest.mark.parametrize("family", list(FAMILIES))
def test_app_generates_with_a_saved_adapter(family, saved_models, tmp_path):
    """The demo app on the folder (Flux.2 takes no negative prompt, Sana bins resolutions,
    HiDream renders at its own area): base, live and merged images."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import app as demo_app

    _, _, plan_a, _, _ = FAMILIES[family]
    pipe = from_folder(saved_models(family))
    add(pipe, plan_a, "A", seed=1)
    da.save_adapter(pipe, tmp_path / "subject.safetensors", "A")
    app = demo_app.create_app(str(saved_models(family)), [str(tmp_path / "subject.safetensors")])
    (name,) = app.names
    side = app.size_step  # the smallest size the page offers (Sana: 64, its VAE downsamples 32x)

    def render(adapters, mode="live"):
        req = demo_app.GenerateRequest("a red circle", adapters, steps=2, width=side, height=side, mode=mode)
        return app.generate(req).images[0]

    base, live, merged = render([]), render([(name, 1.0)]), render([(name, 1.0)], "merged")
    assert base.size == live.size == merged.size
    if family != "hidream":  # HiDream: 256 px whatever the request
        assert base.size == (side, side)
    assert base.tobytes() != live.tobytes()
    import numpy as np

    assert np.abs(np.asarray(live, dtype=int) - np.asarray(merged, dtype=int)).max() <= 1


def test_negative_prompt_refused_where_the_pipeline_takes_none(saved_models, capsys):
    code = cli.main(["generate", "--model", str(saved_models("flux2")), "--prompt", "a red circle",
                     "--negative_prompt", "blurry", "--steps", "1", "-o", "unused.png"])
    err = capsys.readouterr().err  # (transformers may log import notices first)
    errors = [line for line in err.splitlines() if line.startswith("diffadapt generate: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "Flux2Pipeline takes no negative prompt" in errors[0]


def test_peft_folder_of_a_text_encoder(saved_models, tmp_path):
    """A plain PEFT folder of a non-CLIP text encoder loads into that component by name."""
    pipe = from_folder(saved_models("zimage"))
    add(pipe, {"text_encoder": ("hra", dict(r=2), "attention")}, "t", seed=3)
    expected = latents(pipe)
    da.save_adapter(pipe.text_encoder, tmp_path / "peft", "t")
    fresh = from_folder(saved_models("zimage"))
    da.load_adapter(fresh, tmp_path / "peft", "t", component="text_encoder")
    torch.testing.assert_close(latents(fresh), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(da.CheckpointError, match="Qwen3Model|does not fit|no layer|not"):
        da.load_adapter(from_folder(saved_models("zimage")), tmp_path / "peft", "t")  # default: the denoiser


@pytest.mark.parametrize("family", [*FAMILIES, *VIDEO])
def test_tiny_pipeline_is_reproducible_and_reads_the_prompt(family):
    """The builders: deterministic, the offline tokenizers feed the prompt through, the VAE decodes."""
    pipe = tp.NEW_BUILDERS[family](0)
    a = latents(pipe)
    assert torch.isfinite(a).all() and torch.equal(a, latents(tp.NEW_BUILDERS[family](0)))
    assert not torch.equal(a, tp.generate(pipe, size=32, prompt="a blue square")), "the prompt must matter"
    assert not torch.equal(a, tp.generate(pipe, size=32, seed=1))
    if family in VIDEO:
        (video,) = tp.generate(pipe, size=64, output_type="np")
        assert video.shape == (tp.WAN_FRAMES, 64, 64, 3) and 0 <= video.min() <= video.max() <= 1
        return
    (image,) = tp.generate(pipe, size=64, output_type="pil")
    assert image.mode == "RGB" and min(image.size) >= 64


def test_adapter_for_another_family_is_refused_naming_the_component(saved_models, tmp_path):
    zimage = from_folder(saved_models("zimage"))
    add(zimage, FAMILIES["zimage"][2], "z", seed=1)
    da.save_adapter(zimage, tmp_path / "z.safetensors", "z")
    lumina = from_folder(saved_models("lumina2"))  # also transformer + text_encoder, other classes
    before = base_weights(lumina)
    with pytest.raises(da.CheckpointError, match="made for a (ZImageTransformer2DModel as component 'transformer'; "
                       "this pipeline's is a Lumina2Transformer2DModel|Qwen3Model as component 'text_encoder'; "
                       "this pipeline's is a Gemma2Model)") as err:
        da.load_adapter(lumina, tmp_path / "z.safetensors", "z")
    assert "\n" not in str(err.value)
    assert_base_restored(lumina, before)
    assert not any("_diffadapt" in m.__dict__ for m in da.pipeline.components(lumina).values())

    hidream = from_folder(saved_models("hidream"))
    add(hidream, {"text_encoder_4": ("hra", dict(r=2), "attention")}, "h", seed=1)
    da.save_adapter(hidream, tmp_path / "h", "h")
    with pytest.raises(da.CheckpointError, match="'text_encoder_4', which this Lumina2Pipeline does not have"):
        da.load_adapter(lumina, tmp_path / "h", "h")
    with pytest.raises(da.CheckpointError, match=r"'text_encoder_9', which this Lumina2Pipeline does not have "
                       r"\(it has \['text_encoder', 'transformer', 'vae'\]\)"):
        da.load_adapter(lumina, tmp_path / "h" / "text_encoder_4", "h", component="text_encoder_9")


def test_convert_a_peft_folder_against_a_model_names_its_denoiser(saved_models, tmp_path, capsys):
    folder = saved_models("flux2")
    pipe = from_folder(folder)
    add(pipe, {"transformer": ("hra", dict(r=2), "attention")}, "t", seed=4)
    expected = latents(pipe)
    da.save_adapter(pipe.transformer, tmp_path / "peft", "t")  # a PEFT folder of the transformer alone
    out = tmp_path / "t.safetensors"
    assert cli.main(["convert", str(tmp_path / "peft"), str(out), "--model", str(folder)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert set(da.read_pipeline_adapter(out).components) == {"transformer"}
    fresh = from_folder(folder)
    da.load_adapter(fresh, out, "t")
    torch.testing.assert_close(latents(fresh), expected, rtol=1e-6, atol=1e-7)


class _Pipe:
    """A pipeline-like object: ``components`` as diffusers pipelines have it."""

    def __init__(self, **components):
        self.components = components


def test_components_are_found_structurally():
    from diffadapt.artifact import components, denoiser
    from tests import tiny_models as tm

    prior, te = tm.tiny_sd3(0), tm.tiny_t5(0)
    pipe = _Pipe(prior=prior, vae=tp.tiny_vae(0), text_encoder=te, same_encoder=te, tokenizer=None, scale=1.0)
    assert list(components(pipe)) == ["prior", "vae", "text_encoder"]  # a module under two names: one component
    assert denoiser(components(pipe)) == "prior"  # no unet/transformer: the one diffusers model that is no VAE
    assert denoiser({"vae": pipe.components["vae"]}) is None
    assert denoiser({"unet": te, "transformer": prior}) == "unet"

    da.add_adapter(te, da.HRAConfig(r=2), "a")
    assert set(da.list_adapters(pipe)["a"]) == {"text_encoder"}
    da.set_adapters(pipe, ["a"], [0.5])  # acts once on the shared module
    assert da.active_adapters(pipe) == [("a", 0.5)]
