"""train_dreambooth.py on the newer flow-matching families: Flux.2, Qwen-Image and Sana, each a
tiny pipeline (tests/tiny_pipelines.py) saved with ``save_pretrained`` and loaded back with
``DiffusionPipeline.from_pretrained``, as the script loads it.

* oracle: for a latent, a timestep and a prompt, the denoiser inputs train_scripts/families.py
  builds (its pipeline's ``encode_prompt``, packing / patchify, image ids or shapes, guidance,
  timestep scaling) give the denoiser output the pipeline's own ``__call__`` gets at its first
  step (captured with a forward hook; measured: identical), and the prediction, unpacked, packs
  back into that output with the pipeline's own packing (the loss compares it with noise - x in
  the layout noise was added in). A wrong timestep scale changes the output: the check can fail;
* a 2-step training run per family with OFT and one other method (subprocesses): the artifact
  loads into a fresh pipeline and changes its output; every OFT tensor left its identity
  initialisation (the gradient reached every adapted layer);
* the families the loader opens but the script does not train are refused at start: exit code 2,
  one ``error:`` line naming the pipeline class, nothing written; so is --train_text_encoder on
  the language-model encoders of the trained ones.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import diffadapt as da
from tests import tiny_pipelines as tp

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ROOT / "train_scripts" / "train_dreambooth.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT = "a photo of sks blob"
# family -> (resolution: the smallest with 2x2 latent tokens, script flags)
TRAINED = {
    "flux2": (32, ["--max_sequence_length", "32"]),
    "qwenimage": (32, []),
    "sana": (64, ["--max_sequence_length", "32", "--complex_human_instruction", "none"]),
}
METHODS = {  # OFT for every family (the gradient check), and one other method each
    "flux2": ("oft", "fourierft"), "qwenimage": ("oft", "hra"), "sana": ("oft", "boft"),
}
HYPER = {
    "oft": ["--oft_block_size", "8"],
    "fourierft": ["--n_frequency", "32", "--adapter_config", '{"init_weights": true}'],
    "hra": ["--hra_r", "2"],
    "boft": ["--boft_block_size", "4"],
}
# layers whose output never reaches the prediction: in Qwen-Image's last dual-stream block the text
# stream's query, output and MLP only feed the text tokens, which the model drops (hence DDP's
# find_unused_parameters for it); every other adapted layer must get a gradient
NO_GRADIENT = {
    "qwenimage": {"transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.to_add_out",
                  "transformer_blocks.1.txt_mlp.net.0.proj", "transformer_blocks.1.txt_mlp.net.2"},
}
REFUSED = {"zimage": "ZImagePipeline", "chroma": "ChromaPipeline", "lumina2": "Lumina2Pipeline", "wan": "WanPipeline"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with tp.one_torch_thread():
        yield


@pytest.fixture(scope="module")
def families():
    """train_scripts/families.py as a module (sys.path and the sibling modules restored after)."""
    path, had = sys.path[:], set(sys.modules)
    sys.path.insert(0, str(ROOT / "train_scripts"))
    spec = importlib.util.spec_from_file_location("families_under_test", ROOT / "train_scripts" / "families.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up there)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    for name in (spec.name, "common", "sd_parts", "atomic_io"):
        if name not in had:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("train_families")
    for name in [*TRAINED, *REFUSED]:
        tp.NEW_BUILDERS[name](0).save_pretrained(root / name, safe_serialization=True)
    (root / "instance").mkdir()
    for i in range(3):
        image = Image.new("RGB", (48, 40), (220, 220, 220))
        ImageDraw.Draw(image).ellipse((4 + 4 * i, 6, 30 + 4 * i, 32), fill=(200, 40, 40))
        image.save(root / "instance" / f"{i}.png")
    return root


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def script_args(pipe, family, flags) -> types.SimpleNamespace:
    """The arguments families.py reads, as train_dreambooth.py sets them from ``flags``."""
    given = dict(zip(flags[::2], flags[1::2]))
    length = given.get("--max_sequence_length")
    return types.SimpleNamespace(
        max_sequence_length=int(length) if length else family.max_sequence_length, guidance_scale=None,
        complex_human_instruction=given.get("--complex_human_instruction"),
    )


# the pipelines' own packing of model-space latents (B, C, h, w) into what their transformer takes
PACK = {
    "flux2": lambda pipe, x: pipe._pack_latents(x),
    "qwenimage": lambda pipe, x: pipe._pack_latents(x, *x.shape),
    "sana": lambda pipe, x: x,
}


@pytest.mark.parametrize("name", list(TRAINED))
def test_denoiser_inputs_match_the_pipeline_call(name, assets, families):
    pipe = load(assets / name)
    family = families.FAMILIES[type(pipe).__name__]
    size, flags = TRAINED[name]
    args = script_args(pipe, family, flags)
    side = size // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // (4 if name == "qwenimage" else 1)
    if name == "flux2":  # its latents are the VAE's patchified 2x2 (4 x the VAE channels)
        side //= 2
    x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1))

    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(out[0].clone()), with_kwargs=True)
    call = dict(prompt=PROMPT, num_inference_steps=2, height=size, width=size, output_type="latent",
                latents=x if name != "qwenimage" else PACK[name](pipe, x), **family.call(args))
    if name == "sana":
        call["guidance_scale"] = 1.0  # no classifier-free guidance: one denoiser call per step
    with torch.no_grad():
        pipe(**call)
    hook.remove()
    t = pipe.scheduler.timesteps[:1]  # the first step's timestep, on the scheduler's 0-1000 scale

    with torch.no_grad():
        cond = family.encode(pipe, None, None, [PROMPT], args, "cpu")
        inputs = family.inputs(pipe, x, t, cond, args, torch.float32)
        raw = pipe.transformer(**inputs, return_dict=False)[0]
        inputs["timestep"] = inputs["timestep"] * 1.5
        wrong = pipe.transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(raw, seen[0], rtol=0, atol=1e-6)
    assert (wrong - seen[0]).abs().max() > 1e-4  # the comparison sees the timestep scale
    pred = family.output(pipe, raw, x)
    assert pred.shape == x.shape
    assert torch.equal(PACK[name](pipe, pred), raw)


def test_flow_prediction_trains_the_adapter(assets, families):
    """Denoising.predict on Qwen-Image with an OFT adapter: a finite loss whose gradient reaches
    every adapter tensor (in-process; the runs below check it through the saved files)."""
    pipe = load(assets / "qwenimage")
    family = families.FAMILIES["QwenImagePipeline"]
    assert da.add_adapter(pipe.transformer, da.get_method("oft").config_class(oft_block_size=4, r=0), "a",
                          preset="attention+ff")
    args = script_args(pipe, family, [])
    args.__dict__.update(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    denoising = families.Denoising(family, args, pipe, pipe.transformer, torch.float32)
    g = torch.Generator().manual_seed(0)
    latents = denoising.latents(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, g)
    with torch.no_grad():
        cond = family.encode(pipe, None, None, [PROMPT, "a blob"], args, "cpu")
    pred, target, sigmas = denoising.predict(latents, cond, {}, g)
    assert pred.shape == target.shape == latents.shape == (2, 4, 8, 8) and sigmas.shape == (2, 1, 1, 1)
    assert cond["encoder_hidden_states_mask"] is not None  # two lengths: the batch is padded and masked
    loss = denoising.loss(pred, target, sigmas)
    loss.backward()
    grads = {n.split(".adapters.")[0]: p.grad for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert len(grads) > 10 and torch.isfinite(loss)
    assert {n for n, g in grads.items() if g is None or not g.any()} == NO_GRADIENT["qwenimage"]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Every (family, method) run, two at a time; -> {(family, method): (output folder, process)}."""
    out = tmp_path_factory.mktemp("runs")

    def run(job):
        name, method = job
        size, flags = TRAINED[name]
        folder = out / f"{name}_{method}"
        cmd = [sys.executable, str(DREAMBOOTH), "--pretrained_model_name_or_path", str(assets / name),
               "--instance_data_dir", str(assets / "instance"), "--instance_prompt", PROMPT, "--method", method,
               "--resolution", str(size), "--train_batch_size", "2", "--max_train_steps", "2", "--seed", "0",
               "--learning_rate", "1e-2", "--report_to", "none", "--output_dir", str(folder), *flags, *HYPER[method]]
        return job, (folder, subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600))

    jobs = [(name, method) for name, methods in METHODS.items() for method in methods]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


@pytest.mark.parametrize("job", [(n, m) for n, ms in METHODS.items() for m in ms], ids="-".join)
def test_training_run_writes_an_adapter_that_changes_the_pipeline(job, runs, assets):
    name, method = job
    folder, proc = runs[job]
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load(assets / name)
    size = TRAINED[name][0]
    base = tp.generate(pipe, PROMPT, size=size)
    da.load_adapter(pipe, folder)
    assert da.has_adapters(pipe.transformer)
    adapted = tp.generate(pipe, PROMPT, size=size)
    assert not torch.allclose(adapted, base, atol=1e-5)
    if method == "oft":  # identity at the start (zero skew blocks): a tensor moved = its layer got a gradient
        tensors = load_file(glob.glob(str(folder / "transformer" / "*.safetensors"))[0])
        layers = {k: k.removeprefix("base_model.model.").split(".oft_R")[0] for k in tensors}
        still = {layers[k] for k, v in tensors.items() if not v.any()}
        assert len(tensors) > 4 and still == NO_GRADIENT.get(name, set()) & set(layers.values())


@pytest.mark.parametrize("name", list(REFUSED))
def test_untrained_families_are_refused_in_one_line(name, assets, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(DREAMBOOTH), "--pretrained_model_name_or_path", str(assets / name),
           "--instance_data_dir", str(assets / "instance"), "--instance_prompt", PROMPT, "--method", "oft",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1
    assert f"is a {REFUSED[name]};" in lines[-1] and "Flux.2, Qwen-Image, Sana" in lines[-1]
    assert not out.exists() or not any(out.iterdir())  # (the writability check may make the folder)


def test_language_model_text_encoders_stay_frozen(assets, tmp_path):
    cmd = [sys.executable, str(DREAMBOOTH), "--pretrained_model_name_or_path", str(assets / "flux2"),
           "--instance_data_dir", str(assets / "instance"), "--instance_prompt", PROMPT, "--method", "oft",
           "--train_text_encoder", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --train_text_encoder: Flux.2's text encoder stays frozen"), last
