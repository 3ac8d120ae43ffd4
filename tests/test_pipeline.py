"""Pipeline loader: adapters saved from one pipeline reproduce its images in a fresh one, for every
family; switching, blending and merging equal the unmerged computation; the base comes back bit
for bit; wrong files are refused before anything changes; hot-swap does not recompile; CLI."""

from __future__ import annotations

import builtins
import io
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch

import diffadapt as da
from diffadapt import cli
from tests import tiny_pipelines as tp
from tests.tiny_models import randomise  # other tests import it from here too

# family -> (builder, {component: (method, config kwargs, preset)}, save as single file?)
FAMILIES = {
    "sd": (tp.build_sd, {"unet": ("boft", dict(boft_block_size=4, boft_n_butterfly_factor=2), "attention+ff"),
                         "text_encoder": ("boft", dict(boft_block_size=4), "attention")}, False),
    "sdxl": (tp.build_sdxl, {"unet": ("hra", dict(r=4), "attention+ff"),
                             "text_encoder_2": ("hra", dict(r=4), "attention")}, True),
    "sd3": (tp.build_sd3, {"transformer": ("fourierft", dict(n_frequency=50), "attention+ff")}, False),
    "flux": (tp.build_flux, {"transformer": ("oft", dict(oft_block_size=4, r=0), "attention+ff")}, True),
    "pixart": (tp.build_pixart, {"transformer": ("frod", dict(sparse_rate=0.05, progressbar=False), "attention")}, False),
    "sd_controlnet": (tp.build_sd_controlnet, {"unet": ("hra", dict(r=2), "attention"),
                                               "controlnet": ("hra", dict(r=2), "attention")}, True),
    "sdxl_controlnet": (tp.build_sdxl_controlnet, {"unet": ("boft", dict(boft_block_size=4), "attention")}, False),
}


def add(pipe, plan, name, seed=0):
    for component, (method, kwargs, preset) in plan.items():
        module = getattr(pipe, component)
        da.add_adapter(module, da.get_method(method).config_class(**kwargs), name, preset=preset)
        randomise(module, name, seed)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def base_weights(pipe):
    """Every component's own weights, under their original names (adapters excluded)."""
    return {
        (c, k.replace(".base_layer", "")): v.clone()
        for c, m in da.pipeline.components(pipe).items()
        for k, v in m.state_dict().items()
        if ".adapters." not in k
    }


def assert_base_restored(pipe, reference):
    now = base_weights(pipe)
    assert now.keys() == reference.keys()
    for key, v in reference.items():
        assert torch.equal(now[key], v), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_adapter_reproduces_the_image_in_a_fresh_pipeline(tmp_path, family):
    build, plan, single_file = FAMILIES[family]
    pipe = build()
    base = tp.generate(pipe)
    add(pipe, plan, "subject")
    adapted = tp.generate(pipe)
    assert rel(adapted, base) > 1e-3, "the adapter must change the image"
    path = tmp_path / ("subject.safetensors" if single_file else "subject")
    da.save_adapter(pipe, path, "subject", metadata={"instance_prompt": "a photo of sks hexagon"})

    fresh = build()
    saved = da.load_adapter(fresh, path, "subject")
    assert saved.metadata["instance_prompt"] == "a photo of sks hexagon"
    assert set(saved.components) == set(plan)
    torch.testing.assert_close(tp.generate(fresh), adapted, rtol=1e-6, atol=1e-7)
    assert set(da.list_adapters(fresh)["subject"]) == set(plan)


@pytest.fixture(scope="module")
def sd_two_adapters():
    pipe = tp.build_sd()
    reference = base_weights(pipe)
    base = tp.generate(pipe)
    add(pipe, {"unet": ("boft", dict(boft_block_size=4, boft_n_butterfly_factor=2), "attention+ff"),
               "text_encoder": ("hra", dict(r=4), "attention")}, "A", seed=1)
    # FourierFT from a zero spectrum plus noise, like a trained adapter: PEFT's default random
    # N(0,1) spectrum at scaling 150 makes this UNet's q/k weights 8x larger and its attention
    # chaotic, so fp32 rounding anywhere (not the merge) is amplified past 1e-5.
    add(pipe, {"unet": ("fourierft", dict(n_frequency=60, init_weights=True), "attention")}, "B", seed=2)
    return pipe, reference, base


@pytest.mark.parametrize(
    "names, strengths",
    [(["A"], [1.0]), (["B"], [1.0]), (["A", "B"], [0.5, 1.0]), (["B", "A"], [1.0, 0.7]), (["A", "B"], [1.0, 0.0])],
)
def test_merged_switches_equal_unmerged(sd_two_adapters, names, strengths):
    pipe, reference, base = sd_two_adapters
    da.set_adapters(pipe, names, strengths)
    live = tp.generate(pipe)
    assert rel(live, base) > 1e-4
    da.merge_adapters(pipe)
    merged = tp.generate(pipe)
    da.unmerge_adapters(pipe)
    assert rel(merged, live) < 1e-5
    assert_base_restored(pipe, reference)


def test_switch_sequences_leave_base_bit_identical(sd_two_adapters):
    pipe, reference, base = sd_two_adapters
    da.set_adapters(pipe, ["A"])
    da.merge_adapters(pipe)
    for names, strengths in [(["B"], [1.0]), (["A", "B"], [0.3, 0.9]), (["A"], [2.0]), (["B", "A"], [1.0, 1.0])]:
        da.set_adapters(pipe, names, strengths)  # merge-switch: unmerge the old, merge the new
    da.disable_adapters(pipe)
    assert torch.equal(tp.generate(pipe), base)
    assert_base_restored(pipe, reference)
    da.enable_adapters(pipe)
    da.unmerge_adapters(pipe)
    assert_base_restored(pipe, reference)
    assert dict(da.active_adapters(pipe)) == {"B": 1.0, "A": 1.0}


def test_switching_reads_no_files_and_builds_no_buffers(sd_two_adapters, monkeypatch):
    """Switching, blending, merging and unmerging open no file (Python's open, safetensors' and
    torch's readers, wherever they are bound) and keep every component's buffers: the very same
    tensors under the same names, none added, none rebuilt."""
    pipe, _, _ = sd_two_adapters
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    before = {n: dict(m.named_buffers()) for n, m in modules.items()}
    assert set(da.list_adapters(pipe)["A"]) == {"unet", "text_encoder"}  # two adapted components

    def read(*args, **kwargs):
        pytest.fail(f"switching read a file: {args[:1]}")

    for owner in (builtins, io, safetensors, safetensors.torch, da.checkpoint):
        for name in ("open", "safe_open", "load_file", "read_safetensors"):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, read)
    monkeypatch.setattr(torch, "load", read)
    for names, strengths in ((["A"], [1.0]), (["B"], [1.0]), (["A", "B"], [0.5, 1.0]), (["B", "A"], [1.0, 0.3])):
        da.set_adapters(pipe, names, strengths)
        da.merge_adapters(pipe)
        da.unmerge_adapters(pipe)
    monkeypatch.undo()
    for n, m in modules.items():
        now = dict(m.named_buffers())
        assert now.keys() == before[n].keys(), n
        assert all(now[k] is before[n][k] for k in now), n


def test_file_for_another_architecture_is_refused_before_any_change(tmp_path):
    sd = tp.build_sd()
    add(sd, FAMILIES["sd"][1], "x")
    da.save_adapter(sd, tmp_path / "sd", "x")
    sd3 = tp.build_sd3()
    before = base_weights(sd3)
    with pytest.raises(da.CheckpointError, match="'unet', which this StableDiffusion3Pipeline does not have"):
        da.load_adapter(sd3, tmp_path / "sd", "x")
    sdxl = tp.build_sdxl()
    with pytest.raises(da.CheckpointError, match="made for a CLIPTextModel|does not fit|does not have"):
        da.load_adapter(sdxl, tmp_path / "sd", "x")
    assert_base_restored(sd3, before)
    for pipe in (sd3, sdxl):
        assert not any("_diffadapt" in m.__dict__ for m in da.pipeline.components(pipe).values())


def test_peft_folder_goes_into_the_denoiser(tmp_path):
    pipe = tp.build_sd()
    add(pipe, {"unet": ("hra", dict(r=2), "attention")}, "h")
    expected = tp.generate(pipe)
    da.save_adapter(pipe.unet, tmp_path / "peft", "h")  # a PEFT folder of the UNet alone
    fresh = tp.build_sd()
    da.load_adapter(fresh, tmp_path / "peft", "h")
    torch.testing.assert_close(tp.generate(fresh), expected, rtol=1e-6, atol=1e-7)


def test_hotswap_replaces_weights_without_recompiling(tmp_path):
    from torch._dynamo.utils import counters

    pipe = tp.build_sd3()
    plan = {"transformer": ("hra", dict(r=4), "attention")}
    add(pipe, plan, "style", seed=1)
    # the compiled graph rotates activations (no kept eval weights): compare with that same eager path
    da.set_keep_eval_weights(pipe, False)
    da.save_adapter(pipe, tmp_path / "one", "style")
    randomise(pipe.transformer, "style", seed=7)
    expected_two = tp.generate(pipe)
    da.save_adapter(pipe, tmp_path / "two", "style")
    da.hotswap_adapter(pipe, tmp_path / "one", "style")
    expected_one = tp.generate(pipe)

    torch._dynamo.reset()
    counters.clear()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    torch.testing.assert_close(tp.generate(pipe), expected_one, rtol=1e-5, atol=1e-6)
    frames = counters["stats"]["unique_graphs"]
    params = {id(p) for p in pipe.transformer.parameters()}
    da.hotswap_adapter(pipe, tmp_path / "two", "style")
    torch.testing.assert_close(tp.generate(pipe), expected_two, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == frames, "hot-swap caused a recompile"
    assert {id(p) for p in pipe.transformer.parameters()} == params
    torch._dynamo.reset()

    other = tp.build_sd3()
    add(other, {"transformer": ("hra", dict(r=2), "attention")}, "style")
    da.save_adapter(other, tmp_path / "r2", "style")
    with pytest.raises(da.CheckpointError, match=r"cannot be hot-swapped.*differs in \['r'\]"):
        da.hotswap_adapter(pipe, tmp_path / "r2", "style")


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pipe = tp.build_sd()
    pipe.save_pretrained(root / "model", safe_serialization=True)
    add(pipe, {"unet": ("boft", dict(boft_block_size=4), "attention")}, "a")
    da.save_adapter(pipe, root / "adapter.safetensors", "a", metadata={"instance_prompt": "sks"})
    sd3 = tp.build_sd3()
    add(sd3, {"transformer": ("hra", dict(r=2), "attention")}, "b")
    da.save_adapter(sd3, root / "sd3_adapter", "b")
    return root


def test_cli_generates_a_png_offline(saved_sd, tmp_path):
    out = tmp_path / "img.png"
    result = subprocess.run(
        [sys.executable, "-m", "diffadapt.cli", "generate", "--model", str(saved_sd / "model"),
         "--adapter", f"{saved_sd / 'adapter.safetensors'}:0.8", "--merge", "--prompt", "a red circle",
         "--steps", "2", "--height", "32", "--width", "32", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    assert "adapter.safetensors@0.8" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "{root}/nope", "--prompt", "x"], "cannot load the pipeline"),
        (["generate", "--model", "{root}/model", "--adapter", "{root}/missing", "--prompt", "x"], "no adapter at"),
        (["generate", "--model", "{root}/model", "--adapter", "{root}/sd3_adapter", "--prompt", "x"],
         "'transformer', which this StableDiffusionPipeline does not have"),
        (["generate", "--model", "{root}/model", "--adapter", "{root}/corrupt.safetensors", "--prompt", "x"],
         "not a readable safetensors file"),
        (["info", "{root}/corrupt.safetensors"], "not a readable safetensors file"),
    ],
)
def test_cli_errors_are_one_line(saved_sd, capsys, argv, message):
    (saved_sd / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    code = cli.main([a.format(root=saved_sd) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_cli_info_and_convert_roundtrip(saved_sd, tmp_path, capsys):
    assert cli.main(["info", str(saved_sd / "adapter.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "boft on UNet2DConditionModel" in out and "instance_prompt: sks" in out
    assert cli.main(["convert", str(saved_sd / "adapter.safetensors"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert cli.main(["convert", str(tmp_path / "peft"), str(tmp_path / "back.safetensors"), "--component", "unet"]) == 0
    a = da.read_pipeline_adapter(saved_sd / "adapter.safetensors").components["unet"].tensors
    b = da.read_pipeline_adapter(tmp_path / "back.safetensors").components["unet"].tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
