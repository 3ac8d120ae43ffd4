"""``diffadapt`` command line and ``diffadapt.files``: every numeric flag is checked (one line,
exit code 2, before any model loads); ``generate`` and ``info`` take diffadapt, PEFT and
LyCORIS/kohya/ComfyUI files alike, read once against the model that is loaded.

(The older CLI tests live in test_pipeline.py and test_formats.py.)
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import diffadapt as da
from diffadapt import cli, files
from tests import tiny_models as tm, tiny_pipelines as tp

ROOT = Path(__file__).resolve().parents[1]


randomise = functools.partial(tm.randomise, scale=0.3)


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


# -- hostile files through the command (issue 14: items 1 and 2) ------------------------------------
def _hostile_cli_files(made, root: Path) -> dict:
    """A regex bomb in an overrides key (90 KB) and in modules_to_save, and r=3,000,000 in a
    90 KB file: each would hang for ever in re.fullmatch on the model's module names, or build
    ~10 GB of slots, if the loader trusted the file."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffadapt.checkpoint import WEIGHTS_NAME

    def read(path):
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}

    out = {}
    for name, field, value in [("bomb_peft", "modules_to_save", [r"(\w+\.?)+z"]), ("huge_peft", "r", 3_000_000)]:
        folder = root / name
        shutil.copytree(made.peft, folder)
        meta, tensors = read(folder / WEIGHTS_NAME)
        config = json.loads(meta["diffadapt_config"])
        config[field] = value
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={**meta, "diffadapt_config": json.dumps(config)})
        out[name] = folder
    meta, tensors = read(made.mine)
    header = json.loads(meta["diffadapt"])
    header["components"]["unet"]["config"]["overrides"] = {r"(\w+\.?)+" + "z" * 90_000: {"oft_block_size": 4}}
    out["bomb90k"] = root / "bomb90k.safetensors"
    save_file(tensors, str(out["bomb90k"]), metadata={**meta, "diffadapt": json.dumps(header)})
    assert out["bomb90k"].stat().st_size < 200_000 and (out["huge_peft"] / WEIGHTS_NAME).stat().st_size < 100_000
    return out


def test_hostile_files_through_generate_and_info_are_bounded_in_time_and_memory(made, tmp_path):
    """Subprocesses (a hang would hold the GIL: only a separate process can time it out; generate
    and info --model load the adapter through the same files.load), run together, each under a 3 GB address-space limit (a regression fails, it does not swap the
    machine): exit code 2 (or info's "fits: no"), one line naming the field or the shapes, within
    the timeout, and a peak RSS below the ceiling (a normal refusal: ~450 MB)."""
    import os
    import resource
    import signal
    import threading
    import time

    hostile = _hostile_cli_files(made, tmp_path)
    model = str(made.model)
    size = ["--steps", "1", "--height", "32", "--width", "32", "-o", str(tmp_path / "never.png")]
    cases = {  # id -> (argv, exit code, words in the one stderr line (rc 2) or in stdout (rc 0))
        "generate regex bomb 90 KB": (["generate", "--prompt", "x", "--model", model, "--adapter",
                                       str(hostile["bomb90k"]), *size], 2,
                                      ["bomb90k.safetensors", "overrides key pattern", "(90009 chars)", "at most 1000"]),
        "info regex bomb": (["info", str(hostile["bomb_peft"])], 2,
                            ["bomb_peft", "modules_to_save pattern", r"'(\\w+\\.?)+z'", "nested quantifier"]),
        "info r=3e6": (["info", str(hostile["huge_peft"]), "--model", model], 0,
                       ["fits StableDiffusionPipeline", ": no", "hra_u: file (32, 2) vs layer (32, 3000000)"]),
    }
    ceiling_mb, timeout_s = 1200, 150

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = {name: (subprocess.Popen([sys.executable, "-m", "diffadapt.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, preexec_fn=limit,
                                     start_new_session=True), time.monotonic())
             for name, (argv, _, _) in cases.items()}

    outputs = {}

    def drain(name, proc):  # read both pipes while it runs (no pipe-buffer deadlock)
        outputs[name] = (proc.stdout.read(), proc.stderr.read())

    readers = [threading.Thread(target=drain, args=(n, p), daemon=True) for n, (p, _) in procs.items()]
    for r in readers:
        r.start()
    results = {}
    while len(results) < len(procs):
        for name, (proc, start) in procs.items():
            if name in results:
                continue
            if time.monotonic() - start > timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's group
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                results[name] = (proc.returncode, time.monotonic() - start, usage.ru_maxrss / 1024)
        time.sleep(0.05)
    for r in readers:
        r.join(timeout=10)
    for name, (rc, seconds, peak_mb) in results.items():
        argv, code, words = cases[name]
        out, err = outputs[name]
        assert rc == code, f"{name}: exit code {rc} after {seconds:.0f} s\n{err[-2000:]}"
        assert seconds < timeout_s - 30, f"{name} took {seconds:.0f} s"
        assert peak_mb < ceiling_mb, f"{name}: peak RSS {peak_mb:.0f} MB"
        assert "Traceback" not in err, f"{name}:\n{err[-2000:]}"
        if code == 2:
            lines = [line for line in err.splitlines() if "error" in line]
            assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], f"{name}:\n{err[-2000:]}"
            assert len(lines[0]) < 1000 and not out.strip(), (name, lines[0][:2000])
            text = lines[0]
        else:
            text = out
        for word in words:
            assert word in text, (name, word, text[-1500:])
    assert not (tmp_path / "never.png").exists()
    print("\nhostile CLI runs (s, peak MB):", {n: (round(s), round(m)) for n, (_, s, m) in results.items()})
