"""The adapter runtime: targeting and presets, atomic injection, composition of several adapters
on one layer, strength, merge/unmerge exactness, delete/unload, checkpoints that do not fit."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import diffadapt as da
from tests import tiny_models as tm

SMALL = {
    "fourierft": lambda **kw: da.FourierFTConfig(n_frequency=30, **kw),
    "boft": lambda **kw: da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, **kw),
    "oft": lambda **kw: da.OFTConfig(oft_block_size=4, r=0, **kw),
    "hra": lambda **kw: da.HRAConfig(r=4, **kw),
    "frod": lambda **kw: da.FRoDConfig(sparse_rate=0.05, progressbar=False, **kw),
}


randomise = functools.partial(tm.randomise, scale=0.1)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, reference):
    now = model.state_dict()
    assert set(now) == set(reference)
    for k, v in reference.items():
        assert torch.equal(now[k], v), k


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- targeting ------------------------------------------------------------------------------------
def _adapted(model, preset):
    return da.add_adapter(model, da.HRAConfig(r=2), "a", preset=preset)


def test_unet_presets_hit_attention_and_ff_only():
    attn = _adapted(tm.tiny_unet(), "attention")
    assert attn and all(n.split(".")[-2] in ("attn1", "attn2", "to_out") for n in attn)
    assert {n.rsplit(".", 1)[-1] for n in attn} == {"to_q", "to_k", "to_v", "0"}
    both = _adapted(tm.tiny_unet(), "attention+ff")
    assert set(both) - set(attn) and all(n.endswith(("ff.net.0.proj", "ff.net.2")) for n in set(both) - set(attn))


def test_dit_presets_are_anchored():
    sd3 = _adapted(tm.tiny_sd3(), "attention+ff")
    assert "proj_out" not in sd3 and "transformer_blocks.0.attn.to_add_out" in sd3
    assert "transformer_blocks.1.attn.to_add_out" not in sd3  # last SD3 block has no context output
    assert "transformer_blocks.0.ff_context.net.2" in sd3
    flux = _adapted(tm.tiny_flux(), "attention+ff")
    assert "proj_out" not in flux
    assert {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp"} <= set(flux)
    assert "single_transformer_blocks.0.attn.to_q" in flux and "transformer_blocks.0.attn.add_k_proj" in flux
    pixart = _adapted(tm.tiny_pixart(), "attention")
    assert "proj_out" not in pixart and "transformer_blocks.1.attn2.to_k" in pixart


@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_presets(with_projection):
    names = _adapted(tm.tiny_clip(with_projection=with_projection), "attention+ff")
    assert len(names) == 2 * 6
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2") for n in names)


def test_unknown_preset_and_architecture_errors():
    with pytest.raises(da.AdapterConfigError, match="Unknown preset 'attentoin'.*attention"):
        _adapted(tm.tiny_unet(), "attentoin")
    with pytest.raises(da.AdapterConfigError, match="No target presets for Sequential.*target_modules"):
        _adapted(nn.Sequential(nn.Linear(4, 4)), "attention")


def test_zero_matches_lists_nearest_module_names():
    with pytest.raises(da.AdapterConfigError, match=r"matches no adaptable layer.*Nearest module names: .*to_q"):
        da.add_adapter(tm.tiny_unet(), da.HRAConfig(r=2, target_modules=["to_qq"]))


def test_regex_exclude_and_layers_to_transform():
    names = da.add_adapter(
        tm.tiny_clip(), da.HRAConfig(r=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj", exclude_modules=["v_proj"])
    )
    assert names == ["text_model.encoder.layers.1.self_attn.q_proj"] or names == ["encoder.layers.1.self_attn.q_proj"]
    names = da.add_adapter(tm.tiny_clip(), da.HRAConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert {n.split("encoder.")[-1] for n in names} == {"layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"}


def test_layers_to_transform_follows_peft():
    """PEFT's rules: a string target_modules refuses a layer filter; without layers_pattern the
    block index is the first numbered part with two components before it (never ``to_out.0``)."""
    from peft import HRAConfig as PeftHRA

    with pytest.raises(da.AdapterConfigError, match="layers_to_transform cannot be used when target_modules is a string"):
        da.HRAConfig(r=2, target_modules=r".*to_q", layers_to_transform=[0])
    with pytest.raises(ValueError):
        PeftHRA(r=2, target_modules=r".*to_q", layers_to_transform=[0])
    targets = ["to_q", "to_out.0"]
    for layers in ([0], [1]):
        ours = da.add_adapter(tm.tiny_unet(), da.HRAConfig(r=2, target_modules=targets, layers_to_transform=layers))
        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        peft_model = get_peft_model(tm.tiny_unet(), PeftHRA(r=2, target_modules=targets, layers_to_transform=layers))
        theirs = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
        assert ours == theirs and any(n.endswith("to_out.0") for n in ours)  # block index from attentions.<i>


def test_all_linear_leaves_out_the_output_embedding_as_peft():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    names = da.add_adapter(model, da.HRAConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in names and any(n.endswith("c_attn") for n in names)


def test_injection_is_atomic():
    model = tm.tiny_unet()
    before = state(model)
    kinds = [type(m) for m in model.modules()]
    # block size 48 divides nothing of width 32 -> the first failing layer aborts everything
    with pytest.raises(da.AdapterConfigError, match="to_q"):
        da.add_adapter(model, da.BOFTConfig(boft_block_size=48), "a")
    assert [type(m) for m in model.modules()] == kinds
    assert_state_equal(model, before)
    assert "_diffadapt" not in model.__dict__


def test_only_adapter_parameters_are_trainable():
    model = tm.tiny_unet()
    da.add_adapter(model, SMALL["hra"](), "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a.hra_u" in n for n in trainable)
    n_trainable, total = da.count_parameters(model)
    assert n_trainable == sum(p.numel() for p in da.adapter_parameters(model, "a").values()) < total


# -- composition, strength, merge ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapter_unet():
    model = tm.tiny_unet()
    targets = ["to_q", "to_v", "ff.net.2", "proj_in"]
    base_state = state(model)
    da.add_adapter(model, SMALL["boft"](target_modules=targets), "rot")
    da.add_adapter(model, SMALL["fourierft"](target_modules=targets[:3]), "fft")
    da.add_adapter(model, SMALL["hra"](target_modules=targets), "hh")
    for i, name in enumerate(["rot", "fft", "hh"]):
        randomise(model, name, seed=i)
    return model, base_state


def test_merged_equals_live_for_non_commuting_adapters(two_adapter_unet):
    model, base_state = two_adapter_unet
    inputs = tm.unet_inputs()
    da.set_adapters(model, ["rot", "fft", "hh"], [0.7, 1.0, 1.3])
    with torch.no_grad():
        live = model(**inputs).sample
        da.merge_adapters(model)
        merged = model(**inputs).sample
        da.unmerge_adapters(model)
        # another order is another function: composition really is ordered
        da.set_adapters(model, ["hh", "fft", "rot"], [1.3, 1.0, 0.7])
        other = model(**inputs).sample
    assert rel(merged, live) < 1e-5
    assert rel(other, live) > 1e-4
    for name, host in da.model.hosts(model):
        assert torch.equal(host.base_layer.weight, base_state[f"{name}.weight"])


def test_hundred_merge_unmerge_cycles_leave_weights_bit_identical(two_adapter_unet):
    model, base_state = two_adapter_unet
    da.set_adapters(model, ["rot", "hh"], [1.0, 0.5])
    for i in range(100):
        da.merge_adapters(model)
        if i % 2:
            da.set_adapters(model, ["fft", "rot"], [0.3, 1.0])  # merge-switch while merged
        else:
            da.set_adapters(model, ["rot", "hh"], [1.0, 0.5])
        da.unmerge_adapters(model)
    for name, host in da.model.hosts(model):
        assert torch.equal(host.base_layer.weight, base_state[f"{name}.weight"])


@pytest.mark.parametrize("method", list(SMALL))
def test_strength_zero_is_base_and_one_is_the_adapter(method):
    model = tm.tiny_sd3()
    inputs = tm.sd3_inputs()
    with torch.no_grad():
        base = model(**inputs).sample
    da.add_adapter(model, SMALL[method](), "a", preset="attention+ff")
    randomise(model, "a")
    with torch.no_grad():
        full = model(**inputs).sample
        da.set_adapters(model, "a", 0.0)
        zero = model(**inputs).sample
        da.set_adapters(model, "a", 0.5)
        half = model(**inputs).sample
        da.set_adapters(model, "a", 1.0)
        one = model(**inputs).sample
        da.disable_adapters(model)
        off = model(**inputs).sample
        da.enable_adapters(model)
        on = model(**inputs).sample
    assert torch.equal(zero, base) and torch.equal(off, base)
    assert torch.equal(one, full) and torch.equal(on, full)
    assert rel(full, base) > 1e-3 and rel(half, base) > 1e-4 and rel(half, full) > 1e-4


def test_delete_and_unload_restore_the_original_modules_bit_exactly():
    model = tm.tiny_unet()
    reference = state(model)
    originals = {n: m for n, m in model.named_modules()}
    da.add_adapter(model, SMALL["boft"](target_modules=["to_q", "proj_in"]), "rot")
    da.add_adapter(model, SMALL["frod"](target_modules=["to_q", "to_k"]), "fr")
    randomise(model, "rot")
    da.set_adapters(model, ["rot", "fr"])
    da.merge_adapters(model)
    da.delete_adapter(model, "fr")
    assert "fr" not in da.list_adapters(model)
    assert all("fr" not in host.adapters for _, host in da.model.hosts(model))
    assert not any(n.endswith("to_k") for n, _ in da.model.hosts(model))  # only fr was there
    da.unload(model)
    assert {n: m for n, m in model.named_modules()} == originals
    assert_state_equal(model, reference)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_adapter_names_are_refused():
    model = tm.tiny_clip()
    da.add_adapter(model, SMALL["hra"](target_modules=["q_proj"]), "a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        da.add_adapter(model, SMALL["hra"](target_modules=["q_proj"]), "a")
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['b'\]; loaded: \['a'\]"):
        da.set_adapters(model, ["b"])
    with pytest.raises(ValueError, match="2 strengths for 1 adapters"):
        da.set_adapters(model, ["a"], [1.0, 2.0])


def test_all_methods_composed_on_one_linear_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU())
    for name, make in SMALL.items():
        da.add_adapter(model, make(target_modules=["0"]), name)
        randomise(model, name)
    da.set_adapters(model, list(SMALL), [1.0, 0.5, 1.0, 0.8, 1.0])
    x = torch.randn(3, 16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# -- checkpoints that do not fit ---------------------------------------------------------------------
def test_checkpoint_with_wrong_shapes_is_refused_and_model_untouched(tmp_path):
    model = tm.tiny_unet()
    da.add_adapter(model, SMALL["hra"](), "a")
    da.save_adapter(model, tmp_path / "a", "a")
    other = tm.tiny_unet(widths=(16, 32))
    before = state(other)
    with pytest.raises(da.CheckpointError, match=r"hra_u: file \(32, 4\) vs layer \(16, 4\)"):
        da.load_adapter(other, tmp_path / "a")
    assert_state_equal(other, before)
    assert not da.model.hosts(other)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    model = tm.tiny_unet()
    da.add_adapter(model, SMALL["boft"](), "a")
    da.save_adapter(model, tmp_path / "a", "a")
    clip = tm.tiny_clip()
    with pytest.raises(da.CheckpointError, match="does not have.*another architecture.*to_q"):
        da.load_adapter(clip, tmp_path / "a")
    assert not da.model.hosts(clip)


def test_corrupt_and_missing_checkpoints(tmp_path):
    model = tm.tiny_clip()
    da.add_adapter(model, SMALL["fourierft"](target_modules=["q_proj"]), "a")
    folder = da.save_adapter(model, tmp_path / "a", "a")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(da.CheckpointError, match="not a readable safetensors file"):
        da.load_adapter(tm.tiny_clip(), folder)
    with pytest.raises(da.CheckpointError, match="No adapter at .*nowhere"):
        da.load_adapter(tm.tiny_clip(), tmp_path / "nowhere")


def test_save_load_roundtrip_all_methods(tmp_path):
    inputs = tm.clip_inputs()
    for name, make in SMALL.items():
        model = tm.tiny_clip()
        da.add_adapter(model, make(target_modules=["q_proj", "out_proj", "fc1"]), name)
        randomise(model, name)
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
        da.save_adapter(model, tmp_path / name, name)
        fresh = tm.tiny_clip()
        da.load_adapter(fresh, tmp_path / name, "x")
        with torch.no_grad():
            assert torch.equal(fresh(**inputs).last_hidden_state, expected), name


def test_frod_mixed_width_unet_roundtrip_uses_group_keys(tmp_path):
    """PEFT cannot build FRoD on a UNet (widths 32/64 in one category); diffadapt groups by role
    and shape, and its files key the bases by group so they reload exactly."""
    model = tm.tiny_unet()
    inputs = tm.unet_inputs()
    da.add_adapter(model, SMALL["frod"](), "f")
    randomise(model, "f")
    with torch.no_grad():
        expected = model(**inputs).sample
    da.save_adapter(model, tmp_path / "f", "f")
    keys = da.read_adapter(tmp_path / "f")[1]
    assert any(k.startswith("base_model.frod_V.") and "@64x64" in k for k in keys)
    fresh = tm.tiny_unet()
    da.load_adapter(fresh, tmp_path / "f")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).sample, expected)


def test_modules_to_save_train_save_and_reload(tmp_path):
    model = tm.tiny_unet()
    inputs = tm.unet_inputs()
    with torch.no_grad():
        base = model(**inputs).sample
    da.add_adapter(model, SMALL["hra"](modules_to_save=["conv_in"]), "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"conv_in.copies.a.weight", "conv_in.copies.a.bias"} <= trainable
    with torch.no_grad():
        model.conv_in.copies["a"].weight.mul_(1.5)
        changed = model(**inputs).sample
        da.set_adapters(model, "a", 0.0)  # strength 0: the whole adapter is off, module copy too
        assert torch.equal(model(**inputs).sample, base)
        da.set_adapters(model, "a", 0.5)
        assert rel(model(**inputs).sample, base) > 1e-3
        da.disable_adapters(model)
        assert torch.equal(model(**inputs).sample, base)
        da.enable_adapters(model)
        da.set_adapters(model, "a", 1.0)
    folder = da.save_adapter(model, tmp_path / "a", "a")
    assert "base_model.model.conv_in.weight" in da.read_adapter(folder)[1]
    fresh = tm.tiny_unet()
    da.load_adapter(fresh, folder, "a")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).sample, changed)
    da.unload(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).sample, base)
    with pytest.raises(da.AdapterConfigError, match=r"modules_to_save \['conv_nope'\] match no module"):
        da.add_adapter(tm.tiny_unet(), SMALL["hra"](modules_to_save=["conv_nope"]), "a")


@pytest.mark.parametrize("method", list(SMALL))
def test_every_method_trains_under_bf16_autocast(method):
    """Mixed-precision training (accelerate's autocast): forward and backward run, gradients reach
    the adapter, and the output tracks the float32 one."""
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    da.add_adapter(model, SMALL[method](target_modules=["0", "2"]), "a")
    randomise(model, "a")
    x = torch.randn(4, 32)
    with torch.no_grad():
        reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    grads = [p.grad for p in da.adapter_parameters(model, "a").values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert rel(y.float(), reference) < 3e-2


def test_overrides_are_checked_when_the_config_is_made():
    """Unknown or targeting fields and bad values in overrides: one line at construction, not a
    TypeError (or a late error) when the layer's config is derived."""
    import diffadapt as da
    from diffadapt.methods import AdapterConfigError

    with pytest.raises(AdapterConfigError, match=r"override 'to_q' sets \['oft_blok_size'\]; they are not per-layer fields.*allowed per layer: \['bias', 'block_share'"):
        da.OFTConfig(overrides={"to_q": {"oft_blok_size": 8}})
    with pytest.raises(AdapterConfigError, match=r"sets \['target_modules'\]"):
        da.HRAConfig(overrides={"to_q": {"target_modules": ["x"]}})
    with pytest.raises(AdapterConfigError, match=r"override 'to_q': .*boft_dropout"):
        da.BOFTConfig(overrides={"to_q": {"boft_dropout": 2.0}})
    assert da.BOFTConfig(overrides={"to_q": {"boft_block_size": 8}}).for_layer("a.to_q").boft_block_size == 8


@pytest.mark.parametrize("stack", [("oft",), ("boft",), ("hra",), ("boft-output",), ("hra", "oft")])
def test_rotations_on_the_weight_equal_rotations_on_the_activations_float64(stack, monkeypatch):
    """A layer whose live steps are all rotations takes the weight path (``F.linear(x, f(W))``, the
    weight's gradient ``g^T x`` and one rotation of the weight's rows) where it sees many tokens for
    its width, else rotates the activations; each path is taken where the cost rule says, and both
    give the same outputs and gradients (input, every adapter parameter; float64), with and without
    autograd, for input- and output-side rotations, BOFT's scale and a stack of two rotations."""
    import diffadapt.host as host_module

    configs = {
        "oft": lambda: da.OFTConfig(target_modules=["0"], oft_block_size=4, r=0, init_weights=False),
        "boft": lambda: da.BOFTConfig(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=2,
                                      init_weights=False),
        "boft-output": lambda: da.BOFTConfig(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=2,
                                             init_weights=False, rotation_side="output"),
        "hra": lambda: da.HRAConfig(target_modules=["0"], r=2, init_weights=False),
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).double().requires_grad_(False)
    for i, name in enumerate(stack):
        da.add_adapter(model, configs[name](), f"a{i}")
    da.set_adapters(model, [f"a{i}" for i in range(len(stack))])
    params = [p for i in range(len(stack)) for p in da.adapter_parameters(model, f"a{i}").values()]
    for p in params:
        p.requires_grad_(True)
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.2)
    composed = []  # the weight path composes f(W); the activation path never does for a linear layer
    compose = host_module.AdapterHost.compose
    monkeypatch.setattr(host_module.AdapterHost, "compose", staticmethod(
        lambda weight, steps: composed.append(1) or compose(weight, steps)))
    rule = host_module._WEIGHT_PATH_GAIN
    for tokens, rule_says_weight in ((64, True), (2, False)):
        x = torch.randn(tokens, 8, dtype=torch.float64, requires_grad=True)
        results = []
        for gain in (rule, 0.0, 1e9):  # the rule, never, always
            monkeypatch.setattr(host_module, "_WEIGHT_PATH_GAIN", gain)
            composed.clear()
            y = model(x)
            grads = torch.autograd.grad(y.square().sum(), (x, *params))
            results.append((y.detach(), grads, bool(composed)))
        assert [r[2] for r in results] == [rule_says_weight, False, True]
        for y, grads, _ in results[1:]:
            torch.testing.assert_close(y, results[0][0], rtol=1e-12, atol=1e-12)
            for a, b in zip(grads, results[0][1]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        monkeypatch.setattr(host_module, "_WEIGHT_PATH_GAIN", rule)
        with torch.no_grad():  # without autograd (training mode: no kept weights): the weight path where
            composed.clear()   # it rotates fewer rows than the activations have
            torch.testing.assert_close(model(x), results[0][0], rtol=1e-12, atol=1e-12)
            assert bool(composed) is (tokens >= 8)
            torch._dynamo.reset()  # and as one graph (a merge's strided out= write would break it)
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(x), results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), results[0][0],
                                   rtol=1e-12, atol=1e-12)
