"""Model-level parity with PEFT: same config + same (random, non-identity) weights => same outputs,
and checkpoint folders cross over both ways. Tiny UNet, SD3 transformer and CLIP text encoder."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

import diffadapt as da
from diffadapt.formats import peft as peft_format
from tests import tiny_models as tm

# method -> (diffadapt config kwargs, extra targets only PEFT supports for this method too)
METHOD_KWARGS = {
    "fourierft": dict(n_frequency=40, init_weights=False),
    "boft": dict(boft_block_size=4, boft_n_butterfly_factor=2),
    "oft": dict(oft_block_size=4, r=0),
    "hra": dict(r=4),
    "frod": dict(sparse_rate=0.05, progressbar=False, projection_mode="peft"),
}
CONV_OK = {"boft", "oft", "hra"}  # PEFT has Conv2d for these

MODELS = {
    "unet": (tm.tiny_unet, tm.unet_inputs, ["to_q", "to_v", "to_out.0", "ff.net.2"], ["proj_in"]),
    "sd3": (tm.tiny_sd3, tm.sd3_inputs, ["to_q", "to_k", "add_q_proj", "to_add_out", "ff_context.net.2"], []),
    "clip": (tm.tiny_clip, tm.clip_inputs, ["q_proj", "v_proj", "out_proj", "fc1"], []),
}


def _out(model, inputs):
    out = model(**inputs)
    if hasattr(out, "sample"):
        return out.sample
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _config(method, targets):
    cls = da.get_method(method).config_class
    return cls(target_modules=list(targets), **METHOD_KWARGS[method])


def _randomise_peft(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.1
                if "boft_s" in name:
                    p.copy_(1 + noise)
                elif "frod_lambda_l" in name:
                    p.mul_(1 + noise)
                else:
                    p.add_(noise)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _builder_and_targets(model_key, method):
    build, _, targets, conv = MODELS[model_key]
    if method == "frod" and model_key == "unet":
        # PEFT's FRoD crashes when one category mixes widths (32/64); one width keeps PEFT working.
        # diffadapt's own mixed-width grouping is tested in tests/methods/test_frod.py.
        build = lambda: tm.tiny_unet(widths=(32, 32))  # noqa: E731
    return build, targets + (conv if method in CONV_OK else [])


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("method", list(METHOD_KWARGS))
def test_peft_file_loads_into_diffadapt_with_same_outputs(tmp_path, model_key, method, dense_butterfly):
    _, inputs_fn, _, _ = MODELS[model_key]
    build, targets = _builder_and_targets(model_key, method)
    inputs = inputs_fn()
    ours_cfg = _config(method, targets)
    peft_cfg = PEFT_TYPE_TO_CONFIG_MAPPING[peft_format.peft_type(ours_cfg.method)](**peft_format.to_peft_dict(ours_cfg))
    peft_model = get_peft_model(build(), peft_cfg)
    _randomise_peft(peft_model)
    with torch.no_grad():
        expected = _out(peft_model.get_base_model(), inputs)
        base = _out(build(), inputs)
    assert _rel(expected, base) > 1e-3, "the reference adapter must not be the identity"
    peft_model.save_pretrained(tmp_path / "peft")

    model = build()
    da.load_adapter(model, tmp_path / "peft" , adapter_name="a")
    with torch.no_grad():
        got = _out(model, inputs)
    assert _rel(got, expected) < 1e-5

    # and back: diffadapt's folder into PEFT
    da.save_adapter(model, tmp_path / "ours", "a")
    reloaded = PeftModel.from_pretrained(build(), tmp_path / "ours")
    with torch.no_grad():
        again = _out(reloaded.get_base_model(), inputs)
    assert _rel(again, expected) < 1e-5


@pytest.mark.parametrize("model_key", ["sd3", "clip"])
@pytest.mark.parametrize("method", list(METHOD_KWARGS))
def test_fresh_adapter_matches_peft_initialisation(model_key, method, dense_butterfly):
    """Same seed, same config: identical fixed structure (positions, bases) as PEFT's."""
    build, inputs_fn, targets, _ = MODELS[model_key]
    inputs = inputs_fn()
    cfg = _config(method, targets)
    model = build()
    da.add_adapter(model, cfg, "a")
    peft_model = get_peft_model(build(), PEFT_TYPE_TO_CONFIG_MAPPING[peft_format.peft_type(cfg.method)](**peft_format.to_peft_dict(cfg)))
    _randomise_peft(peft_model)
    # copy PEFT's trainable values into ours through the file key names
    reference = get_peft_model_state_dict(peft_model)
    keys = peft_format.keys(method)
    with torch.no_grad():
        for path_key, p in da.model.adapter_parameters(model, "a").items():
            path, _, key = path_key.rpartition(".")
            value = reference[f"base_model.model.{path}.{keys[key]}"]
            assert value.shape == p.shape, path_key
            p.copy_(value)
    with torch.no_grad():
        assert _rel(_out(model, inputs), _out(peft_model.get_base_model(), inputs)) < 1e-5


def test_modules_to_save_cross_over_with_peft(tmp_path):
    inputs = tm.unet_inputs()
    cfg = da.HRAConfig(r=4, target_modules=["to_q"], modules_to_save=["conv_in"])
    peft_model = get_peft_model(tm.tiny_unet(), PEFT_TYPE_TO_CONFIG_MAPPING["HRA"](**peft_format.to_peft_dict(cfg)))
    _randomise_peft(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.conv_in.modules_to_save["default"].weight.mul_(1.3)
        expected = _out(peft_model.get_base_model(), inputs)
    peft_model.save_pretrained(tmp_path / "peft")
    model = tm.tiny_unet()
    da.load_adapter(model, tmp_path / "peft", "a")
    with torch.no_grad():
        assert _rel(_out(model, inputs), expected) < 1e-5
    da.save_adapter(model, tmp_path / "ours", "a")
    reloaded = PeftModel.from_pretrained(tm.tiny_unet(), tmp_path / "ours")
    with torch.no_grad():
        assert _rel(_out(reloaded.get_base_model(), inputs), expected) < 1e-5


@pytest.mark.parametrize("method", ["oft", "boft", "hra", "fourierft"])
def test_several_peft_adapters_activated_as_peft_does(tmp_path, method, dense_butterfly):
    """Two PEFT adapters of one method, active together in PEFT ([a, b]): loaded into diffadapt and
    activated with set_adapters(..., order="peft") they give PEFT's function (PEFT composes HRA and
    BOFT the other way round from diffadapt's own order, OFT the same way)."""
    build, inputs_fn, targets, _ = MODELS["clip"]
    inputs = inputs_fn()
    cfg = _config(method, targets)
    peft_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_format.peft_type(cfg.method)]
    pm = get_peft_model(build(), peft_cls(**peft_format.to_peft_dict(cfg)), adapter_name="x1")
    pm.add_adapter("x2", peft_cls(**peft_format.to_peft_dict(cfg)))
    for i, name in enumerate(("x1", "x2")):
        pm.base_model.set_adapter(name)
        _randomise_peft(pm, seed=10 + i)
        pm.save_pretrained(tmp_path / name, selected_adapters=[name])
    pm.base_model.set_adapter(["x1", "x2"])
    with torch.no_grad():
        expected = _out(pm.get_base_model(), inputs)
    model = build()
    for name in ("x1", "x2"):
        folder = tmp_path / name / name if (tmp_path / name / name).is_dir() else tmp_path / name
        da.load_adapter(model, folder, adapter_name=name)
    da.set_adapters(model, ["x1", "x2"], order="peft")
    with torch.no_grad():
        got = _out(model, inputs)
        da.set_adapters(model, ["x2", "x1"], order="peft")
        swapped = _out(model, inputs)
    assert _rel(got, expected) < 1e-5
    if da.get_method(method).multiplicative:
        assert _rel(swapped, expected) > 1e-4, "the two orders must differ for the test to mean anything"
    with pytest.raises(ValueError, match="order='sideways'"):
        da.set_adapters(model, ["x1"], order="sideways")
