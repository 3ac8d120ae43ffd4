"""Training checkpoints are adapters (diffadapt.training): ``checkpoint-<step>/<role>/`` is a PEFT
adapter folder that ``diffadapt.load_adapter`` loads into a fresh pipeline, giving exactly the
model of that step; resuming copies the saved values back into the run's own parameters (the
optimizer's), bit for bit, for every method; other trained tensors (a ControlNet's new layers)
travel in ``<role>.trained_weights.safetensors``; diffadapt 0.1 checkpoints still resume; a
checkpoint of another training is refused in one line naming the file and the tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

import diffadapt as da
from diffadapt import training
from tests import tiny_pipelines as tp
from tests.tiny_models import randomise, tiny_unet, unet_inputs

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_v"]
CONFIGS = {
    "fourierft": lambda: da.FourierFTConfig(n_frequency=16, target_modules=TARGETS),
    "boft": lambda: da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS),
    "oft": lambda: da.OFTConfig(oft_block_size=8, target_modules=TARGETS),
    "hra": lambda: da.HRAConfig(r=4, target_modules=TARGETS),
    "frod": lambda: da.FRoDConfig(sparse_rate=0.05, target_modules=TARGETS),
}


def trained_unet(method: str):
    """A tiny UNet with a randomised adapter, and its conv_in trained in full besides."""
    unet = tiny_unet(0).requires_grad_(False)
    da.add_adapter(unet, CONFIGS[method](), "default")
    randomise(unet, "default", seed=3)
    unet.conv_in.requires_grad_(True)
    return unet


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**unet_inputs()).sample


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_state_writes_adapters_and_load_state_restores_in_place(method, tmp_path):
    unet = trained_unet(method)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad])
    accelerator.prepare(unet, optimizer)
    training.register_checkpoint_hooks(accelerator, {"unet": unet}, base_model="tiny")
    accelerator.save_state(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"unet", "unet.trained_weights.safetensors", "optimizer.bin"}
    assert not any(p.name.startswith("pytorch_model") or p.name.startswith("model") for p in tmp_path.iterdir())
    assert set(load_file(tmp_path / "unet.trained_weights.safetensors")) == {"conv_in.weight", "conv_in.bias"}
    saved, objects, reference = trained(unet), {n: id(p) for n, p in unet.named_parameters()}, output(unet)

    # the checkpoint is an adapter: a fresh model with it (and the trained conv_in) is the trained model
    fresh = tiny_unet(0)
    da.load_adapter(fresh, tmp_path / "unet")
    fresh.load_state_dict({f"conv_in.{k.split('.')[-1]}": v for k, v in
                           load_file(tmp_path / "unet.trained_weights.safetensors").items()}, strict=False)
    assert torch.equal(output(fresh), reference)

    with torch.no_grad():  # training goes on; resume brings the checkpoint's values back
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert not torch.equal(output(unet), reference)
    accelerator.load_state(tmp_path)
    assert {n: id(p) for n, p in unet.named_parameters()} == objects  # the optimizer's parameters
    for name, value in trained(unet).items():
        assert torch.equal(value, saved[name]), f"{method} {name}"
    assert torch.equal(output(unet), reference)


def test_old_layout_still_resumes(tmp_path):
    """diffadapt 0.1 wrote every trained tensor by parameter name into <role>.trainable.safetensors."""
    unet = trained_unet("hra")
    saved = trained(unet)
    save_file(training.trainable_state(unet), str(tmp_path / "unet.trainable.safetensors"))
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.zero_()
    training.load_trained(unet, tmp_path, "unet")
    for name, value in trained(unet).items():
        assert torch.equal(value, saved[name]), name


def test_checkpoint_of_another_training_is_refused(tmp_path):
    unet = trained_unet("oft")
    training.save_trained(unet, tmp_path, "unet")
    with pytest.raises(da.CheckpointError, match=r"no controlnet/ adapter folder"):
        training.load_trained(unet, tmp_path, "controlnet")
    other = tiny_unet(0).requires_grad_(False)  # the same adapter, conv_out trained instead of conv_in
    da.add_adapter(other, CONFIGS["oft"](), "default")
    other.conv_out.requires_grad_(True)
    with pytest.raises(da.CheckpointError, match=r"unet.trained_weights.safetensors holds other tensors.*conv_"):
        training.load_trained(other, tmp_path, "unet")
    only_adapter = tiny_unet(0).requires_grad_(False)
    da.add_adapter(only_adapter, CONFIGS["oft"](), "default")
    (tmp_path / "unet.trained_weights.safetensors").unlink()
    only_adapter.conv_in.requires_grad_(True)
    with pytest.raises(da.CheckpointError, match=r"no unet.trained_weights.safetensors.*'conv_in.weight'"):
        training.load_trained(only_adapter, tmp_path, "unet")


def test_script_checkpoint_loads_as_the_adapter_of_its_step(tmp_path):
    """train_dreambooth.py, 2 steps with a checkpoint after each: checkpoint-2/<role> loaded with
    da.load_adapter into a fresh pipeline gives exactly the outputs of the final adapter (the
    model at step 2); checkpoint-1's outputs differ from them."""
    tp.BUILDERS["sd"](0).save_pretrained(tmp_path / "sd", safe_serialization=True)
    (tmp_path / "instance").mkdir()
    for i in range(4):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / "instance" / f"{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, ROOT / "train_scripts" / "train_dreambooth.py", "--pretrained_model_name_or_path",
           tmp_path / "sd", "--instance_data_dir", tmp_path / "instance", "--instance_prompt", "a photo of sks blob",
           "--method", "boft", "--boft_block_size", "4", "--learning_rate", "0.03", "--train_text_encoder",
           "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "1",
           "--seed", "0", "--report_to", "none", "--output_dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    job = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]

    def images(load) -> torch.Tensor:
        pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        load(pipe)
        return tp.generate(pipe, "a photo of sks blob", size=32)

    def from_checkpoint(step):
        def load(pipe):
            da.load_adapter(pipe, out / f"checkpoint-{step}" / "unet")
            da.load_adapter(pipe, out / f"checkpoint-{step}" / "text_encoder", component="text_encoder")
        return load

    final = images(lambda pipe: da.load_adapter(pipe, out))
    assert torch.equal(images(from_checkpoint(2)), final)
    assert not torch.allclose(images(from_checkpoint(1)), final, atol=1e-6)
    for role in ("unet", "text_encoder"):
        a = load_file(out / role / "adapter_model.safetensors")
        b = load_file(out / "checkpoint-2" / role / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
