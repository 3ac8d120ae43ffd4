"""``diffadapt`` command line and ``diffadapt.files``: every numeric flag is checked (one line,
exit code 2, before any model loads); ``generate`` and ``info`` take diffadapt, PEFT and
LyCORIS/kohya/ComfyUI files alike, read once against the model that is loaded.

(The older CLI tests live in test_pipeline.py and test_formats.py.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffadapt as da
from diffadapt import cli, files
from tests import tiny_pipelines as tp

ROOT = Path(__file__).resolve().parents[1]


def randomise(module, name, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in da.adapter_parameters(module, name).items():
            noise = torch.randn(p.shape, generator=g) * scale
            p.mul_(1 + noise) if key.endswith("boft_s") else p.add_(noise)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny SD pipeline saved as a folder, and adapters for it in every format."""
    root = tmp_path_factory.mktemp("cli_files")
    pipe = tp.build_sd(0)
    pipe.save_pretrained(root / "model", safe_serialization=True)
    # output-side OFT on the UNet and the text encoder: writable as LyCORIS oft_blocks without a model
    da.add_adapter(pipe.unet, da.OFTConfig(oft_block_size=4, rotation_side="output"), "o", preset="attention")
    da.add_adapter(pipe.text_encoder, da.OFTConfig(oft_block_size=4, rotation_side="output"), "o", preset="attention")
    randomise(pipe.unet, "o", 1)
    randomise(pipe.text_encoder, "o", 2)
    mine = da.save_adapter(pipe, root / "oft.safetensors", "o", metadata={"instance_prompt": "sks"})
    lyco = root / "oft_lycoris.safetensors"
    da.save_lycoris(pipe, lyco, "o")
    da.add_adapter(pipe.unet, da.HRAConfig(r=2), "h", preset="attention")
    randomise(pipe.unet, "h", 3)
    peft = da.save_adapter(pipe.unet, root / "hra_peft", "h")  # a plain PEFT folder
    lora = root / "hra_lora.safetensors"
    da.save_lycoris(pipe, lora, "h", lora_rank=2)  # a LoRA file: described, never loaded
    sd3 = tp.build_sd3(0)
    da.add_adapter(sd3.transformer, da.HRAConfig(r=2), "b", preset="attention")
    other = da.save_adapter(sd3, root / "sd3.safetensors", "b")
    return SimpleNamespace(root=root, model=root / "model", mine=mine, lyco=lyco, peft=peft, lora=lora, other=other)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


# -- numeric flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--steps", "0"], ["--steps", "'0'", ">= 1"]),
        (["--steps", "-1"], ["--steps", "'-1'"]),
        (["--steps", "2.5"], ["--steps", "'2.5'"]),
        (["--guidance", "nan"], ["--guidance", "'nan'", "finite"]),
        (["--guidance", "inf"], ["--guidance", "'inf'"]),
        (["--guidance=-inf"], ["--guidance", "'-inf'"]),
        (["--height", "30"], ["--height", "'30'", "multiple of 8"]),
        (["--width", "0"], ["--width", "'0'"]),
        (["--width", "-64"], ["--width", "'-64'"]),
        (["--seed", "-1"], ["--seed", "'-1'"]),
        (["--seed", "x"], ["--seed", "'x'"]),
        (["--adapter", "style.safetensors:nan"], ["--adapter", "style.safetensors", "'nan'", "finite"]),
        (["--adapter", "style.safetensors:inf"], ["--adapter", "style.safetensors", "'inf'"]),
        (["--adapter", "a/b/style:-inf"], ["--adapter", "a/b/style", "'-inf'"]),
        (["--dtype", "float8"], ["--dtype", "float8"]),
    ],
)
def test_bad_numbers_are_refused_in_one_line_before_any_model_loads(capsys, monkeypatch, flags, words):
    def no_model(*args, **kwargs):
        raise AssertionError("a bad flag must be refused before the model loads")

    monkeypatch.setattr(cli, "_load_pipeline", no_model)
    code, out, err = run(capsys, "generate", "--prompt", "x", *flags)
    one_line_error(code, err, "diffadapt generate: error: argument", *words)


def test_convert_lora_rank_and_the_exit_code_of_the_command(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "a.safetensors", "b.safetensors", "--to", "lycoris", "--lora-rank", "0")
    one_line_error(code, err, "--lora-rank", "'0'")
    result = subprocess.run([sys.executable, "-m", "diffadapt.cli", "generate", "--prompt", "x", "--steps", "0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and not result.stdout
    one_line_error(result.returncode, result.stderr, "--steps")
    assert cli.main(["generate", "--help"]) == 0
    assert "--steps" in capsys.readouterr().out


def test_a_missing_or_damaged_adapter_is_refused_before_the_model_loads(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a, **k: pytest.fail("the model must not load"))
    code, _, err = run(capsys, "generate", "--prompt", "x", "--adapter", tmp_path / "nope.safetensors:0.5")
    one_line_error(code, err, "no adapter at", "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run(capsys, "generate", "--prompt", "x", "--adapter", bad)
    one_line_error(code, err, "bad.safetensors is not a readable safetensors file")
    code, _, err = run(capsys, "generate", "--prompt", "x", "--device", "gpu:zero")
    one_line_error(code, err, "--device", "gpu:zero")


# -- every format through generate ----------------------------------------------------------------
def test_generate_takes_every_format_read_once(made, capsys, tmp_path, monkeypatch):
    reads = []
    original = files.read_pipeline_adapter

    def counting(path, *args, **kwargs):
        reads.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(files, "read_pipeline_adapter", counting)
    common = ["generate", "--model", made.model, "--prompt", "a red circle", "--steps", "2", "--height", "32",
              "--width", "32", "--guidance", "1"]
    images = {}
    for label, adapters in {
        "base": [],
        "diffadapt": [f"{made.mine}:0.8"],
        "lycoris": [f"{made.lyco}:0.8"],
        "peft": [f"{made.peft}:0.7"],
        "lycoris+peft": [f"{made.lyco}:0.8", f"{made.peft}:0.7"],
    }.items():
        out = tmp_path / f"{label}.png"
        reads.clear()
        code, stdout, err = run(capsys, *common, *[x for a in adapters for x in ("--adapter", a)], "-o", out)
        assert code == 0, err
        assert len(reads) == len(adapters), f"each adapter file is read once: {reads}"
        from PIL import Image

        images[label] = np.asarray(Image.open(out).convert("RGB"))
        assert images[label].shape == (32, 32, 3)
    assert f"{made.lyco.name}@0.8" in stdout and f"{made.peft.name}@0.7" in stdout
    # the LyCORIS file is the same adapter as the diffadapt file: the same image
    np.testing.assert_array_equal(images["lycoris"], images["diffadapt"])
    assert not np.array_equal(images["lycoris"], images["base"])
    assert not np.array_equal(images["lycoris+peft"], images["lycoris"])


def test_generate_refuses_files_that_do_not_fit_in_one_line(made, capsys):
    base = ["generate", "--model", made.model, "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32"]
    code, _, err = run(capsys, *base, "--adapter", made.lora)
    one_line_error(code, err, "LoRA/LoCon", "oft_blocks")
    code, _, err = run(capsys, *base, "--adapter", made.other)
    one_line_error(code, err, "'transformer', which this StableDiffusionPipeline does not have")


# -- info -------------------------------------------------------------------------------------------
def test_info_on_a_community_file_without_and_with_the_model(made, capsys):
    code, out, err = run(capsys, "info", made.lyco)
    assert code == 0, err
    assert "LyCORIS/kohya/ComfyUI file" in out
    assert "[denoiser] oft on ?" in out and "[text_encoder] oft on ?" in out and "block_size [4]" in out
    assert "module names not resolved" in out and "--model" in out
    assert "ss_network_module: lycoris.kohya" in out
    code, out, err = run(capsys, "info", made.lyco, "--model", made.model)
    assert code == 0, err
    assert "[unet] oft on UNet2DConditionModel" in out and "[text_encoder] oft on CLIPTextModel" in out
    assert "fits StableDiffusionPipeline" in out and ": yes" in out
    code, out, err = run(capsys, "info", made.lyco, "--model", made.model, "--json")
    info = json.loads(out)
    assert info["fits"] is True and info["format"] == "community"
    mine = files.describe(made.mine)
    for name in ("unet", "text_encoder"):  # resolved, it is the adapter the diffadapt file holds
        assert info["components"][name]["layers"] == mine["components"][name]["layers"]
        assert info["components"][name]["parameters"] == mine["components"][name]["parameters"]


def test_info_says_what_it_cannot_load(made, capsys):
    code, out, err = run(capsys, "info", made.lora)
    assert code == 0, err
    assert "LoRA/LoCon" in out and "OFT and BOFT (oft_blocks) only" in out
    code, out, err = run(capsys, "info", made.lora, "--model", made.model)
    assert code == 0, err
    assert ": no" in out and "does not fit this StableDiffusionPipeline" in out
    code, out, err = run(capsys, "info", made.other, "--model", made.model)
    assert code == 0, err
    assert "hra on SD3Transformer2DModel" in out and ": no" in out and "'transformer'" in out
    code, out, err = run(capsys, "info", made.peft, "--model", made.model)
    assert code == 0, err
    assert "[unet] hra on UNet2DConditionModel" in out and ": yes" in out  # the component it goes into


def test_files_peek_read_load(made):
    assert files.peek(made.mine) == "diffadapt"
    assert files.peek(made.lyco) == "community"
    assert files.peek(made.peft) == "peft"
    with pytest.raises(files.UnreadableAdapter, match="No adapter at"):
        files.peek(made.root / "nowhere")
    with pytest.raises(da.CheckpointError, match="resolve only against the base model"):
        files.read(made.lyco)
    pipe = tp.build_sd(0)
    loaded = files.load(pipe, made.lyco, "c")
    assert sorted(loaded.components) == ["text_encoder", "unet"] and str(loaded) == str(made.lyco)
    assert "c" in da.list_adapters(pipe)
    before = da.list_adapters(pipe)
    with pytest.raises(da.CheckpointError, match=r"sd3\.safetensors has adapters for 'transformer'"):
        files.load(pipe, made.other, "x")  # the message names the file, not an object
    assert da.list_adapters(pipe) == before


def test_the_app_does_not_import_the_cli():
    tree = ast.parse((ROOT / "app.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "diffadapt" for a in n.names}
    assert "diffadapt.cli" not in imported and "cli" not in names
