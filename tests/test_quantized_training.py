"""Quantized bases end to end: the training scripts with --quantize_base (DreamBooth nf4 with a
validation step between training steps, gradient checkpointing and 8-bit Adam; int8 with the text
encoder quantized and adapted; the ControlNet script), their files against a float base's and loaded
into a float pipeline; generation on quantized pipelines (live adapters against the dequantized
float pipeline, live switching), ``diffadapt generate --quantize [--merge]`` and the app's merged mode.

The training runs are subprocesses, two at a time, started once for the module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import diffadapt as da
from diffadapt import quantized as Q
from tests import tiny_pipelines as tp

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'diffadapt[quantized]')")

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT / "train_scripts" / "train_dreambooth.py"
CONTROLNET = ROOT / "train_scripts" / "train_controlnet.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT = "a photo of sks blob"
# same-seed generation, quantized pipeline vs the same pipeline with every quantized layer replaced by
# its dequantized float copy (eval, no autograd: bitsandbytes' inference kernels). Measured on the tiny
# SD pipeline, OFT adapter, 3 steps: nf4 5e-4, int8 3.4e-3 relative; the adapter itself moves the
# images by 6.5e-2, so 1e-2 tells "the same adapter" from "another adapter or none".
GEN_TOL = 1e-2


def _blob(seed, size=(40, 40)):
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    x = rng.randrange(4, size[0] - 24)
    ImageDraw.Draw(img).ellipse((x, 6, x + 20, 30), fill=(140, 50, 180))
    return img


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("quantized_training")
    tp.BUILDERS["sd"](0).save_pretrained(root / "sd", safe_serialization=True)
    (root / "instance").mkdir()
    for i in range(4):
        _blob(i).save(root / "instance" / f"{i}.png")
    data = root / "control"
    (data / "images").mkdir(parents=True)
    (data / "conditioning_images").mkdir()
    rows = []
    for i in range(2):
        image, cond = Image.new("RGB", (32, 32), (235, 235, 235)), Image.new("RGB", (32, 32), (0, 0, 0))
        ImageDraw.Draw(image).ellipse((4 + 4 * i, 6, 20 + 4 * i, 22), fill=(220, 40, 40))
        ImageDraw.Draw(cond).ellipse((4 + 4 * i, 6, 20 + 4 * i, 22), outline=(255, 255, 255))
        image.save(data / "images" / f"{i}.png")
        cond.save(data / "conditioning_images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "conditioning_image": f"conditioning_images/{i}.png", "text": "a circle"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _dreambooth(assets, out, *extra):
    return [sys.executable, str(DREAMBOOTH), "--pretrained_model_name_or_path", str(assets / "sd"),
            "--instance_data_dir", str(assets / "instance"), "--instance_prompt", PROMPT, "--resolution", "32",
            "--train_batch_size", "2", "--seed", "0", "--report_to", "none", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(assets):
    """name -> (returncode, stdout + stderr, output folder); two subprocesses at a time."""
    common = ["--method", "oft", "--oft_block_size", "8", "--learning_rate", "0.03", "--max_train_steps", "4",
              "--validation_prompt", PROMPT, "--validation_steps", "2", "--num_validation_images", "1",
              "--num_inference_steps", "2", "--gradient_checkpointing"]
    jobs = {
        # a validation step between training steps 2 and 3 (eval, no autograd) on a 4-bit base
        "nf4": _dreambooth(assets, assets / "out_nf4", *common, "--quantize_base", "nf4", "--use_8bit_adam"),
        "int8": _dreambooth(assets, assets / "out_int8", "--method", "hra", "--hra_r", "4", "--learning_rate", "0.03",
                            "--max_train_steps", "2", "--quantize_base", "int8", "--quantize_text_encoder",
                            "--train_text_encoder"),
        "controlnet": [sys.executable, str(CONTROLNET), "--pretrained_model_name_or_path", str(assets / "sd"),
                       "--train_data_dir", str(assets / "control"), "--method", "fourierft", "--n_frequency", "64",
                       "--learning_rate", "0.2", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps",
                       "2", "--seed", "0", "--report_to", "none", "--adapt", "unet,controlnet", "--quantize_base", "nf4",
                       "--output_dir", str(assets / "out_cn")],
        "refused": _dreambooth(assets, assets / "out_refused", "--method", "oft", "--quantize_text_encoder"),
    }
    results, names = {}, list(jobs)
    for i in range(0, len(names), 2):
        procs = {n: subprocess.Popen(jobs[n], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                     cwd=ROOT) for n in names[i:i + 2]}
        for n, p in procs.items():
            out, _ = p.communicate(timeout=600)
            results[n] = (p.returncode, out, Path(jobs[n][jobs[n].index("--output_dir") + 1]))
    return results


def _ok(runs, name):
    rc, out, folder = runs[name]
    assert rc == 0, out[-3000:]
    return out, folder


def _log(folder):
    return [json.loads(line) for line in Path(folder, "train_log.jsonl").read_text().splitlines()]


def _float_pipe(assets):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- training --------------------------------------------------------------------------------------
def test_pin_training_kernels_keep_training_after_inference():
    """bitsandbytes' CPU Linear4bit repacks its weight at an eval forward without autograd (AVX512-BF16
    CPUs), after which autograd forwards fail; pinned layers stay on their training kernels: an eval
    no-grad pass between two training steps changes nothing, gradients equal the float reference."""
    torch.manual_seed(0)
    quant = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    assert Q.quantize_model(quant, "nf4") == ["0", "2"]
    ref = copy.deepcopy(quant)
    for i in (0, 2):
        ref[i] = Q.float_copy(quant[i])
    Q.pin_training_kernels(quant)
    for m in (quant, ref):
        torch.manual_seed(7)
        da.add_adapter(m, da.OFTConfig(oft_block_size=16, target_modules=["0", "2"]), "a")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    quant.eval()
    with torch.no_grad():
        quant(x)
    assert not getattr(quant[0].base_layer.weight.quant_state, "packing_format_for_cpu", False)
    grads = []
    for m in (quant.train(), ref.train()):
        m(x).square().sum().backward()
        grads.append([p.grad for p in da.adapter_parameters(m, "a").values()])
    for gq, gr in zip(*grads):
        assert (gq - gr).norm() <= 1e-5 * gr.norm()


def test_dreambooth_nf4_end_to_end_with_validation_between_steps(runs, assets):
    out, folder = _ok(runs, "nf4")
    assert "--quantize_base nf4: Linear layers quantized: unet" in out and "Linear4bit (nf4, double-quantized)" in out
    log = _log(folder)
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in log)
    assert Path(folder, "validation", "step_000002.png").is_file()  # between steps 2 and 3
    assert Path(folder, "validation", "step_000004.png").is_file() and Path(folder, "validation", "final.png").is_file()
    from safetensors.torch import load_file

    q = load_file(str(folder / "unet" / "adapter_model.safetensors"))
    config = json.loads((folder / "unet" / "adapter_config.json").read_text())
    assert any(v.abs().max() > 0 for v in q.values())  # trained (OFT starts at zero)
    # loads into a float pipeline; what it holds is the file, bit for bit
    pipe = _float_pipe(assets)
    da.load_adapter(pipe, folder)
    again = da.save_adapter(pipe, assets / "resaved_nf4")
    tensors = load_file(str(again / "unet" / "adapter_model.safetensors"))
    assert set(tensors) == set(q) and all(torch.equal(tensors[k], q[k]) for k in q)
    same = {k: v for k, v in config.items() if k != "base_model_name_or_path"}  # (the run records its base)
    assert {k: v for k, v in json.loads((again / "unet" / "adapter_config.json").read_text()).items()
            if k != "base_model_name_or_path"} == same
    # the same file as the same adapter on the float base: names, shapes, config
    fresh = _float_pipe(assets)
    import dataclasses

    fields = {f.name for f in dataclasses.fields(da.OFTConfig)}
    da.add_adapter(fresh.unet, da.OFTConfig.from_dict({k: v for k, v in config.items() if k in fields}), "default")
    ref = da.save_adapter(fresh, assets / "float_same_config")
    f = load_file(str(ref / "unet" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in f.items()} == {k: v.shape for k, v in q.items()}
    assert {k: v for k, v in json.loads((ref / "unet" / "adapter_config.json").read_text()).items()
            if k != "base_model_name_or_path"} == same


def test_int8_text_encoder_and_controlnet_runs(runs, assets):
    out, folder = _ok(runs, "int8")
    assert "--quantize_base int8: Linear layers quantized: unet" in out and "text_encoder" in out
    assert len(_log(folder)) == 2 and all(math.isfinite(e["loss"]) for e in _log(folder))
    assert (folder / "text_encoder" / "adapter_model.safetensors").is_file()
    pipe = _float_pipe(assets)
    da.load_adapter(pipe, folder)
    assert set(da.pipeline.adapted(pipe)) == {"unet", "text_encoder"}
    out, folder = _ok(runs, "controlnet")
    assert "--quantize_base nf4: Linear layers quantized: unet" in out
    assert (folder / "controlnet_model").is_dir() and (folder / "unet" / "adapter_model.safetensors").is_file()


def test_quantize_text_encoder_needs_quantize_base(runs):
    rc, out, _ = runs["refused"]
    lines = [line for line in out.strip().splitlines() if "kernels" not in line]
    assert rc == 2 and lines == ["error: --quantize_text_encoder needs --quantize_base (nf4, fp4 or int8): the format "
                                 "to quantize in."]


# -- pipelines ---------------------------------------------------------------------------------------
def _dequantized(pipe):
    ref = copy.deepcopy(pipe)
    for name, m in list(ref.unet.named_modules()):
        if Q.is_quantized(m):
            parent, _, child = name.rpartition(".")
            setattr(ref.unet.get_submodule(parent), child, Q.float_copy(m))
    return ref


def _adapter_file(pipe, path, method="oft", scale=0.1, seed=0):
    pipe = copy.deepcopy(pipe)
    torch.manual_seed(7)
    config = {"oft": lambda: da.OFTConfig(oft_block_size=8), "hra": lambda: da.HRAConfig(r=2),
              "fourierft": lambda: da.FourierFTConfig(n_frequency=32)}[method]()
    da.add_adapter(pipe.unet, config, "a")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in da.adapter_parameters(pipe.unet, "a").values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return da.save_adapter(pipe, path, "a")


def _images(pipe, steps=3):
    out = pipe("a prompt", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    return torch.from_numpy(out.images)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def sd_pipe():
    pipe = tp.BUILDERS["sd"](0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_generate_on_quantized_pipeline_equals_dequantized_and_switches_live(qtype, sd_pipe, tmp_path):
    files = [_adapter_file(sd_pipe, tmp_path / f"{n}.safetensors", seed=i) for i, n in enumerate("ab")]
    quant = copy.deepcopy(sd_pipe)
    assert Q.quantize_pipeline(quant, qtype) == {"unet": 50}
    ref = _dequantized(quant)
    for p in (quant, ref):
        for name, f in zip("ab", files):
            da.load_adapter(p, f, name)
    base = _images(ref.unet and sd_pipe)
    seen = {}
    for name in ("a", "b", "a"):
        for p in (quant, ref):
            da.set_adapters(p, name)
        q, r = _images(quant), _images(ref)
        assert _rel(q, r) < GEN_TOL, (name, _rel(q, r))
        assert _rel(r, base) > 3 * GEN_TOL  # the adapter is visible: the tolerance tells it apart
        if name in seen:
            assert torch.equal(q, seen[name])  # switching back is exact
        seen[name] = q
    assert _rel(seen["a"], seen["b"]) > 3 * GEN_TOL


def test_cli_generate_quantized_merge_report_or_refusal(sd_pipe, assets, tmp_path, capsys):
    from PIL import Image

    from diffadapt import cli

    big = _adapter_file(sd_pipe, tmp_path / "big.safetensors", "hra", scale=1.0)
    tiny = _adapter_file(sd_pipe, tmp_path / "tiny.safetensors", "fourierft", scale=1e-7)
    run = ["generate", "--model", str(assets / "sd"), "--quantize", "nf4", "--steps", "2", "--prompt", "a prompt"]
    assert cli.main([*run, "--adapter", str(big), "--merge", "-o", str(tmp_path / "big.png")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("--merge:")]
    assert len(line) == 1 and line[0].startswith("--merge: merged into 32 quantized layers (requantized): worst "
                                                 "relative weight error")  # the 32 attention layers adapted
    assert cli.main([*run, "--adapter", str(tiny), "--merge", "-o", str(tmp_path / "refused.png")]) == 0
    assert cli.main([*run, "--adapter", str(tiny), "-o", str(tmp_path / "live.png")]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("--merge:")]
    assert len(line) == 1 and line[0].startswith("--merge: merge refused, adapters kept live on the quantized layers "
                                                 "(exact): merging ['adapter0'] into quantized layers: requantizing")
    live, refused = (torch.tensor(list(Image.open(tmp_path / f"{n}.png").getdata())) for n in ("live", "refused"))
    assert torch.equal(live, refused)  # kept live: the same image as without --merge


def test_app_quantized_merged_mode_shows_the_report(sd_pipe, tmp_path):
    import app as demo

    quant = copy.deepcopy(sd_pipe)
    Q.quantize_pipeline(quant, "nf4")
    app = demo.DemoApp(quant)
    app.add_adapter(_adapter_file(sd_pipe, tmp_path / "big.safetensors", "hra", scale=1.0))
    app.add_adapter(_adapter_file(sd_pipe, tmp_path / "tiny.safetensors", "fourierft", scale=1e-7))
    req = dict(prompt="a prompt", steps=2, seed=0)
    res = app.generate(demo.GenerateRequest(adapters=[("big", 1.0)], mode="merged", **req))
    assert res.merge.startswith("merged into 32 quantized layers") and "requantized" in res.summary()
    assert res.as_dict()["merge"] == res.merge
    live = app.generate(demo.GenerateRequest(adapters=[("tiny", 1.0)], mode="live", **req))
    refused = app.generate(demo.GenerateRequest(adapters=[("tiny", 1.0)], mode="merged", **req))
    assert live.merge == "" and refused.merge.startswith("merge refused, adapters kept live")
    assert torch.equal(torch.tensor(list(live.images[0].getdata())), torch.tensor(list(refused.images[0].getdata())))
    grid = app.grid(demo.GenerateRequest(adapters=[("big", 1.0)], mode="merged", **req), "0.5,1")
    assert grid.merge.count("merged into 32 quantized layers") == 2
