"""A method defined in one test-local file (tests/dummy_method.py) and added with one public call,
``diffadapt.methods.register``, works through inject, merge / unmerge, save / load (the shared
contract checks of tests/test_method_contract.py) and the training scripts' flags -- no other
file names it. (The ``diffadapt`` CLI has no per-method flags: it reads methods from files.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import diffadapt as da
from diffadapt import methods
from diffadapt.checkpoint import CheckpointError
from diffadapt.methods import AdapterConfigError
from tests import dummy_method
from tests.dummy_method import DummyScale, DummyScaleConfig
from tests.test_method_contract import (
    check_bad_value_names_field,
    check_batched_prepare,
    check_merge_unmerge,
    check_save_load,
    check_strength_zero_is_base,
)
from tests.test_train_scripts import dreambooth_module  # noqa: F401 - fixture: the script as a module


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # undone after the test
    assert methods.register(DummyScale) is DummyScale


def test_one_call_makes_it_a_method(registered):
    assert "dummyscale" in methods.method_names() and "dummyscale" not in methods.METHOD_NAMES
    assert da.get_method("dummyscale") is DummyScale
    assert methods.config_flags(DummyScale) == [
        methods.ConfigFlag("dummy_init_scale", "init_scale", float, "DummyScale: starting g (0: the base).")
    ]


def test_inject_computes_the_method(registered):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    layer = model[0]
    base = F.linear(x, layer.weight, layer.bias)
    assert da.add_adapter(model, DummyScaleConfig(target_modules=["0"], init_scale=0.5), "d") == ["0"]
    da.set_adapters(model, ["d"], [0.8])
    with torch.no_grad():
        torch.testing.assert_close(model(x), 1.4 * (base - layer.bias) + layer.bias, rtol=1e-12, atol=1e-12)


def test_contract_checks(registered, tmp_path):
    check_strength_zero_is_base(dummy_method.make_config)
    check_merge_unmerge(dummy_method.make_config)
    check_save_load(dummy_method.make_config, tmp_path / "a")
    check_batched_prepare("dummyscale", dummy_method.make_config)
    check_bad_value_names_field(dummy_method.make_config, "init_scale", float("nan"))


def test_saved_folder_uses_its_own_names(registered, tmp_path):
    """No PEFT declaration: the folder says peft_type DUMMYSCALE, each tensor sits under its own
    parameter name, the config's fields are written as they are; a file for another layer is
    refused, naming the key."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))

    model = mlp()
    da.add_adapter(model, DummyScaleConfig(target_modules=["0", "2"], init_scale=0.5, note="n"), "d")
    da.save_adapter(model, tmp_path / "a", "d")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["peft_type"] == "DUMMYSCALE" and written["init_scale"] == 0.5 and written["note"] == "n"
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.0.dummy_g", "base_model.model.2.dummy_g"]
    fresh = mlp()
    da.load_adapter(fresh, tmp_path / "a", "d")
    assert da.adapter_config(fresh, "d") == DummyScaleConfig(target_modules=["0", "2"], init_scale=0.5, note="n")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    tensors["base_model.model.1.dummy_g"] = tensors.pop("base_model.model.2.dummy_g")  # ReLU: not a layer
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"base_model\.model\.1\.dummy_g|model\.1\.dummy_g"):
        da.load_adapter(mlp(), tmp_path / "a", "d")


def test_register_refuses_what_is_taken(registered):
    with pytest.raises(AdapterConfigError, match="'dummyscale' is registered already"):
        methods.register(DummyScale)

    class Clash(DummyScale):
        name = "clash"

    with pytest.raises(AdapterConfigError, match="config_class must be an AdapterConfig subclass with method = 'clash'"):
        methods.register(Clash)


def test_training_script_flags(registered, dreambooth_module, tmp_path, capsys):  # noqa: F811 - the fixture
    data = tmp_path / "instance"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks blob", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    args = dreambooth_module.parse_args([*argv, "--method", "dummyscale", "--dummy_init_scale", "0.25"])
    assert args.learning_rate == DummyScale.learning_rate
    config = dreambooth_module.common.adapter_config(args)
    assert config == DummyScaleConfig(init_scale=0.25, note="from the scripts")  # its training_defaults, then flags
    with pytest.raises(dreambooth_module.UsageError, match="--dummy_init_scale is a dummyscale hyper-parameter"):
        dreambooth_module.common.adapter_fields(dreambooth_module.parse_args([*argv, "--method", "hra",
                                                                              "--dummy_init_scale", "1"]))
    with pytest.raises(SystemExit):
        dreambooth_module.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--dummy_init_scale DUMMY_INIT_SCALE DummyScale: starting g (0: the base)." in shown
    assert "--method {fourierft,boft,oft,hra,frod,dummyscale}" in shown
