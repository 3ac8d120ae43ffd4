"""The adapter plan: state held once, every layer's factors prepared in one batched step per
forward, reuse in eval, exact or refused partial merges, no recompilation on a strength change
or a hot-swap, gradient checkpointing."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import diffadapt as da
from diffadapt.methods import get_method
from tests import tiny_models as tm
from tests.test_runtime import SMALL, randomise, rel

METHODS = list(SMALL)


class Mixed(nn.Module):
    """Linear layers of mixed shapes, several of each shape (so groups have G > 1)."""

    def __init__(self):
        super().__init__()
        self.widths = [(16, 16), (16, 16), (32, 16), (16, 32), (32, 16), (16, 16)]
        self.layers = nn.ModuleList(nn.Linear(i, o) for o, i in self.widths)

    def forward(self, x):  # x: (..., 16); the 32-wide inputs see [x, x]
        return torch.cat([layer(x if i == 16 else torch.cat([x, x], -1)) for layer, (_, i) in zip(self.layers, self.widths)], -1)


def _mixed(dtype=torch.float64, methods=("hra", "boft")):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    for i, m in enumerate(methods):
        da.add_adapter(model, SMALL[m](target_modules=["layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "layers.5"]), f"{m}{i}")
        randomise(model, f"{m}{i}", seed=i)
    da.set_adapters(model, [f"{m}{i}" for i, m in enumerate(methods)], [0.7, 1.3][: len(methods)])
    return model


def _unbatched_forward(model, x):
    """The same model computed with every layer prepared on its own (``Method.prepare``, G = 1)."""
    plan = da.model.adapter_state(model)
    original = plan.prepare

    def one_by_one(names, training):
        steps = [[] for _ in plan.hosts]
        for name in names:
            for host in plan.hosts:
                if name in host.adapters:
                    slot = host.adapters[name]
                    steps[host.index].append((slot.method, slot.prepare(plan.strength(name), training)))
        return steps

    plan.prepare = one_by_one
    plan.changed()
    try:
        return model(x)
    finally:
        plan.prepare = original
        plan.changed()


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_unbatched_float64_mixed_shapes_two_live_adapters(method):
    model = _mixed(methods=(method, "hra" if method != "hra" else "oft"))
    plan = da.model.adapter_state(model)
    assert any(len(idx) > 1 for _, _, _, idx, _, _ in plan.groups(plan.live())), "no batching exercised"
    x = torch.randn(5, 16, dtype=torch.float64)
    batched = model(x)
    unbatched = _unbatched_forward(model, x)
    torch.testing.assert_close(batched, unbatched, rtol=1e-12, atol=1e-12)
    # and the gradients of every adapter parameter
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(model(x).square().sum(), params)
    g2 = torch.autograd.grad(_unbatched_forward(model, x).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_batched_prepare_per_shape_group_and_forward(monkeypatch):
    model = tm.tiny_unet()
    da.add_adapter(model, da.OFTConfig(oft_block_size=4, r=0), "a", preset="attention+ff")
    method = get_method("oft")
    calls = []
    real = method.prepare_many.__func__

    def counting(cls, config, params, *args, **kwargs):
        calls.append(len(params))
        return real(cls, config, params, *args, **kwargs)

    monkeypatch.setattr(method, "prepare_many", classmethod(counting))
    plan = da.model.adapter_state(model)
    plan.changed()
    model.train()
    model(**tm.unet_inputs())
    shapes = {(tuple(h.adapters["a"].oft_R.shape)) for h in plan.hosts}
    assert len(calls) == len(shapes) and sum(calls) == len(plan.hosts)  # one call per shape, all layers


# -- eval reuse --------------------------------------------------------------------------------------
def _counting_unet(monkeypatch, method_name="hra"):
    model = tm.tiny_unet()
    da.add_adapter(model, SMALL[method_name](), "a")
    randomise(model, "a")
    method = get_method(method_name)
    calls = []
    real = method.prepare_many.__func__
    monkeypatch.setattr(method, "prepare_many", classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    return model, calls


def _fresh_output(model, inputs):
    """The output with nothing reused: a deep copy prepares from scratch."""
    other = copy.deepcopy(model)
    da.model.adapter_state(other).changed()
    with torch.no_grad():
        return other(**inputs).sample


def test_eval_reuses_factors_until_something_changes(monkeypatch, tmp_path):
    model, calls = _counting_unet(monkeypatch)
    inputs = tm.unet_inputs()
    with torch.no_grad():
        first = model(**inputs).sample
        n = len(calls)
        again = model(**inputs).sample
    assert len(calls) == n and torch.equal(first, again)  # reused: no prepare at all

    def changed_output(change):
        with torch.no_grad():
            out = model(**inputs).sample
        assert len(calls) > n, f"stale factors reused after {change}"
        torch.testing.assert_close(out, _fresh_output(model, inputs), rtol=0, atol=0)
        assert not torch.equal(out, first), f"the output did not change after {change}"
        return out

    # 1. an optimizer step
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).sample.square().mean().backward()
    opt.step()
    model.eval()
    n = len(calls)
    first = changed_output("an optimizer step")
    # 2. a strength change
    n = len(calls)
    da.set_adapter_strength(model, "a", 0.5)
    first = changed_output("a strength change")
    # 3. load_state_dict of the adapter's parameters
    n = len(calls)
    params = da.adapter_parameters(model, "a")
    values = {k: v.detach() * 1.1 for k, v in params.items()}
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)
    first = changed_output("a parameter update")
    # 4. a hot-swap from a file
    n = len(calls)
    other = tm.tiny_unet()
    da.add_adapter(other, SMALL["hra"](), "a")
    randomise(other, "a", seed=7)
    da.save_adapter(other, tmp_path / "swap", "a")
    da.hotswap_adapter(model, tmp_path / "swap", "a")
    changed_output("a hot-swap")


def test_module_load_state_dict_invalidates_reuse(monkeypatch):
    model, calls = _counting_unet(monkeypatch, "oft")
    inputs = tm.unet_inputs()
    with torch.no_grad():
        before = model(**inputs).sample
    sd = {k: v * 0.5 if "oft_R" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    with torch.no_grad():
        after = model(**inputs).sample
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _fresh_output(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("method_name", ["oft", "fourierft"])
def test_merge_reuses_factors_until_something_changes(monkeypatch, method_name):
    """merge / unmerge / merge prepares once; an in-place parameter change, a strength change and
    load_state_dict each make the next merge prepare again, with the merged weights those of a
    fresh model (bit for bit), and unmerge still restores the originals bit for bit."""
    model, calls = _counting_unet(monkeypatch, method_name)
    inputs = tm.unet_inputs()
    originals = {k: v.clone() for k, v in model.state_dict().items()}

    def merged_output():
        before = len(calls)
        da.merge_adapters(model)
        prepared.append(len(calls) > before)
        with torch.no_grad():
            out = model(**inputs).sample
        fresh = copy.deepcopy(model)
        da.unmerge_adapters(fresh)
        da.model.adapter_state(fresh)._bake_cache = None  # nothing reused there
        da.merge_adapters(fresh)
        with torch.no_grad():
            torch.testing.assert_close(out, fresh(**inputs).sample, rtol=0, atol=0)
        da.unmerge_adapters(model)
        for k, v in model.state_dict().items():
            if k in originals and "base_layer" in k:
                assert torch.equal(v, originals[k]), k
        return out

    prepared = []
    first = merged_output()
    assert torch.equal(merged_output(), first) and prepared == [True, False]  # reused: no prepare
    params = da.adapter_parameters(model, "a")
    for change in ("in place", "strength", "load_state_dict"):
        if change == "in place":
            with torch.no_grad():
                next(iter(params.values())).mul_(1.5)
        elif change == "strength":
            da.set_adapter_strength(model, "a", 0.5)
        else:
            sd = model.state_dict()
            suffixes = tuple({"." + k.rsplit(".", 1)[1] for k in params})
            model.load_state_dict({k: v * 0.9 if k.endswith(suffixes) else v for k, v in sd.items()})
        out = merged_output()
        assert prepared[-1], f"stale merge factors after {change}"
        assert not torch.equal(out, first), change
        first = out


@pytest.mark.parametrize("method_name", ["oft", "fourierft"])  # a rotation and an additive dW
def test_merge_swaps_in_a_new_weight_tensor_only_when_nothing_else_holds_the_storage(method_name):
    """Merging installs the merged values as a new tensor of the same Parameter when no other tensor
    shares the weight's storage, and unmerging puts the very same original tensor back (no copies);
    a storage someone else holds (a state_dict taken before, a view) is written in place as before,
    so that holder sees the merged values. Either way: the same merged weights, the Parameter object
    kept (optimizers, hooks), contiguous (savable), and unmerge bit-exact."""
    from transformers.pytorch_utils import Conv1D

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 24), Conv1D(24, 16), nn.Conv2d(4, 8, 1))
        cfg = get_method(method_name).config_class(target_modules=["0", "1", "2"], init_weights=False,
                                                    **({"oft_block_size": 4, "r": 0} if method_name == "oft"
                                                       else {"n_frequency": 20}))
        da.add_adapter(m, cfg, "a")
        return m

    swap, held = model(), model()
    weights = [h.base_layer.weight for h in swap]
    before = [w.detach().clone() for w in weights]
    storages = [w.untyped_storage().data_ptr() for w in weights]
    outside = held.state_dict()  # holds the weights' storage
    da.merge_adapters(swap)
    da.merge_adapters(held)
    assert [h.swapped for h in swap] == [True] * 3 and [h.swapped for h in held] == [False] * 3
    for h, w, ptr, b, ref in zip(swap, weights, storages, before, held):
        assert h.base_layer.weight is w and w.is_contiguous()  # the same Parameter, a new tensor inside
        assert w.untyped_storage().data_ptr() != ptr and h.original_weight.untyped_storage().data_ptr() == ptr
        assert torch.equal(h.original_weight, b)  # the original, untouched
        assert torch.equal(w, ref.base_layer.weight) and not torch.equal(w, b)  # merged alike both ways
    for name, h in zip("012", held):
        assert torch.equal(outside[f"{name}.base_layer.weight"], h.base_layer.weight)  # the holder sees the merge
    da.unmerge_adapters(swap)
    da.unmerge_adapters(held)
    for h, w, ptr, b in zip(swap, weights, storages, before):
        assert h.base_layer.weight is w and w.untyped_storage().data_ptr() == ptr and torch.equal(w, b)
        assert h.original_weight is None and not h.swapped
    for h, b in zip(held, before):
        assert torch.equal(h.base_layer.weight, b)


# -- partial merges ------------------------------------------------------------------------------------
def _double(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def test_partial_merge_of_the_innermost_adapters_is_exact_and_others_are_refused():
    model = tm.tiny_unet().double()  # float64: "exact" means to rounding of float64
    for name, m in (("rot", "boft"), ("hh", "hra"), ("add", "fourierft")):
        da.add_adapter(model, SMALL[m](), name)
        randomise(model, name, seed=len(name))
    da.set_adapters(model, ["rot", "hh", "add"], [1.0, 0.6, 0.9])
    inputs = _double(tm.unet_inputs())
    with torch.no_grad():
        live = model(**inputs).sample
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="innermost|another function"):
        da.merge_adapters(model, ["rot"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_state.items())  # refused: untouched
    da.merge_adapters(model, ["add"])  # the last one: exact
    with torch.no_grad():
        assert rel(model(**inputs).sample, live) < 1e-12
    # a later verb keeps the partial merge partial
    da.set_adapter_strength(model, "rot", 1.0)
    da.enable_adapters(model)
    assert da.model.adapter_state(model).merged == ["add"]
    da.merge_adapters(model, ["hh"])  # now the last two
    assert da.model.adapter_state(model).merged == ["hh", "add"]
    with torch.no_grad():
        assert rel(model(**inputs).sample, live) < 1e-12
    da.unmerge_adapters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_state.items())


def test_partial_merge_of_additive_adapters_in_any_position_is_exact():
    model = tm.tiny_unet().double()
    for name, m in (("f1", "fourierft"), ("f2", "frod")):
        da.add_adapter(model, SMALL[m](), name)
        randomise(model, name, seed=len(name))
    da.set_adapters(model, ["f1", "f2"], [0.8, 1.2])
    inputs = _double(tm.unet_inputs())
    with torch.no_grad():
        live = model(**inputs).sample
        da.merge_adapters(model, ["f1"])  # not the last, but additive adapters commute
        assert rel(model(**inputs).sample, live) < 1e-12


# -- torch.compile ---------------------------------------------------------------------------------------
def test_strength_change_and_hotswap_do_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    for name in ("oft", "hra", "fourierft"):
        da.add_adapter(model, SMALL[name](target_modules=["0", "2"]), name)
        randomise(model, name)
    da.set_adapters(model, ["oft", "hra", "fourierft"], [0.8, 1.0, 0.5])
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        assert counter.frame_count == 1
        da.set_adapters(model, ["oft", "hra", "fourierft"], [0.3, 1.2, 0.9])
        torch.testing.assert_close(compiled(x), model(x))
        other = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        da.add_adapter(other, SMALL["hra"](target_modules=["0", "2"]), "hra")
        randomise(other, "hra", seed=3)
        da.save_adapter(other, tmp_path / "hra", "hra")
        before = compiled(x)
        da.hotswap_adapter(model, tmp_path / "hra", "hra")
        after = compiled(x)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, model(x))
    assert counter.frame_count == 1, "recompiled"


class _TwoLayers(nn.Module):
    """A model with its own forward: the plan's pre-hook and the forward are two dynamo frames, so
    the prepared factors reach the layers' graph as inputs read from the plan."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_second_compiled_model_gets_static_shapes():
    """Compiling a second model whose adapter has other factor shapes recompiles the same code; the
    factors' shapes must stay static there (dynamo's automatic dynamic shapes made them symbolic:
    7x BOFT's compile time on the small gauge UNet, 682 against 92-108 s)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    symbolic = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if node.op == "placeholder" and isinstance(value, torch.Tensor) and not all(
                is_concrete_int(s) for s in value.shape
            ):
                symbolic.append((node.name, tuple(value.shape)))
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(4, 64)
    configs = [da.OFTConfig(oft_block_size=32, r=0), *(SMALL[m]() for m in ("oft", "boft", "hra", "fourierft", "frod"))]
    configs += [da.HRAConfig(r=2), da.FourierFTConfig(n_frequency=50), da.FRoDConfig(sparse_rate=0.1, progressbar=False)]
    for cfg in configs:  # each after one of its method with other factor shapes (OFT first: BOFT shares its fields)
        model = _TwoLayers()
        da.add_adapter(model, dataclasses.replace(cfg, target_modules=["a", "b"]), "a")
        randomise(model, "a")
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    assert symbolic == []


@pytest.mark.parametrize("method", METHODS)
def test_compiled_unet_fullgraph_trains_like_eager(method):
    torch._dynamo.reset()
    model = tm.tiny_unet()
    extra = {"fast_path": "dense"} if method == "fourierft" else {}  # the folded path (dW rebuilt in backward)
    da.add_adapter(model, SMALL[method](**extra), "a", preset="attention+ff")
    randomise(model, "a")
    model.train()
    inputs = tm.unet_inputs()
    params = [p for p in model.parameters() if p.requires_grad]
    eager = torch.autograd.grad(model(**inputs).sample.square().mean(), params)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    graph = torch.autograd.grad(compiled(**inputs).sample.square().mean(), params)
    for a, b in zip(eager, graph):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- gradient checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_gradients_with_and_without_gradient_checkpointing(method):
    model = tm.tiny_unet().double()
    da.add_adapter(model, SMALL[method](), "a", preset="attention+ff")
    randomise(model, "a")
    model.train()
    inputs = _double(tm.unet_inputs())
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(model(**inputs).sample.square().mean(), params)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    ckpt = torch.autograd.grad(model(**inputs).sample.square().mean(), params)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in ckpt)


@pytest.mark.parametrize("tokens", [64, 16])
@pytest.mark.parametrize("second", ["fourierft", "frod"])
def test_folded_additive_adapters_match_plain_autograd(second, tokens):
    """Two additive adapters folded into one base product (FourierFT's W + dW kept for backward
    when it is no larger than the input, 64 tokens >= d_out 40, else rebuilt and pulled back through
    its adjoint, 16 tokens; FRoD's kept): outputs and gradients equal plain autograd through
    W_eff = f_1(f_2(W)), float64."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 40).double()
    model = nn.Sequential(layer)
    da.add_adapter(model, SMALL["fourierft"](target_modules=["0"], fast_path="dense"), "f")
    extra = {"fast_path": "dense", "random_loc_seed": 5} if second == "fourierft" else {}
    da.add_adapter(model, SMALL[second](target_modules=["0"], **extra), "r")
    for i, n in enumerate(("f", "r")):
        randomise(model, n, seed=i)
    da.set_adapters(model, ["f", "r"], [0.7, 1.2])
    x = torch.randn(tokens, 24, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    host = da.model.hosts(model)[0][1]
    steps = da.model.adapter_state(model).steps_for(host)
    fourier = steps[0]
    assert fourier[0].fold_into_weight(x, fourier[1])  # both token counts fold
    assert fourier[0].keep_folded_weight(x, fourier[1]) == (tokens >= 40)
    reference = torch.nn.functional.linear(x, host.compose(host.base_layer.weight, steps), host.base_layer.bias)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *params], g, retain_graph=True)  # the factors graph is shared
    want = torch.autograd.grad(reference, [x, *params], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["boft", "oft", "frod"])
def test_adapters_added_to_an_eval_model_do_not_drop_out(method):
    """New slots follow their model's mode: no adapter dropout while generating."""
    dropout = {"boft": {"boft_dropout": 0.5}, "oft": {"module_dropout": 0.5}, "frod": {"frod_dropout": 0.5}}[method]
    model = tm.tiny_unet()  # eval()
    da.add_adapter(model, SMALL[method](**dropout), "a")
    randomise(model, "a")
    assert not any(m.training for m in model.modules())
    inputs = tm.unet_inputs()
    with torch.no_grad():
        first, second = model(**inputs).sample, model(**inputs).sample
        da.model.adapter_state(model).changed()  # no reuse: prepare again
        third = model(**inputs).sample
    assert torch.equal(first, second) and torch.equal(first, third)
    model.train()  # and in training mode it does drop
    with torch.no_grad():
        assert not torch.equal(model(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize("method", METHODS)
def test_kept_eval_weights_equal_the_live_forward(method):
    """Generating from the kept W_eff gives the live forward's output (float64), and turning the
    copies off drops them."""
    model = tm.tiny_unet().double()
    da.add_adapter(model, SMALL[method](), "a", preset="attention+ff")
    randomise(model, "a")
    inputs = _double(tm.unet_inputs())
    with torch.no_grad():
        kept = model(**inputs).sample
        hosts = da.model.adapter_state(model).hosts
        assert all("_weight_cache" in h.__dict__ for h in hosts)
        da.set_keep_eval_weights(model, False)
        assert not any("_weight_cache" in h.__dict__ for h in hosts)
        live = model(**inputs).sample
        assert not any("_weight_cache" in h.__dict__ for h in hosts)
    torch.testing.assert_close(kept, live, rtol=1e-10, atol=1e-12)
    da.set_keep_eval_weights(model, True)
    with torch.no_grad():
        model(**inputs)  # a validation run during training keeps copies ...
    assert all("_weight_cache" in h.__dict__ for h in hosts)
    model.train()
    model(**inputs).sample.sum().backward()  # ... that the next training step drops
    assert not any("_weight_cache" in h.__dict__ for h in hosts)


def test_bad_strengths_and_names_are_refused_with_the_adapter_named():
    model = tm.tiny_unet()
    da.add_adapter(model, SMALL["hra"](), "a")
    da.add_adapter(model, SMALL["oft"](), "b")
    da.set_adapters(model, ["a"], [0.5])
    for bad in (float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match="'a' must be a finite number"):
            da.set_adapters(model, ["a"], [bad])
        with pytest.raises(ValueError, match="'a' must be a finite number"):
            da.set_adapter_strength(model, "a", bad)
    with pytest.raises(ValueError, match="'b' is not active"):
        da.set_adapter_strength(model, "b", 0.3)
    with pytest.raises(ValueError, match="'zz' is not loaded"):
        da.set_adapter_strength(model, "zz", 0.3)
    assert da.active_adapters(model) == [("a", 0.5)]


def test_add_adapter_to_a_compiled_model_adapts_the_module_it_wraps(tmp_path):
    torch._dynamo.reset()
    model = tm.tiny_unet()
    compiled = torch.compile(model, backend="eager")
    names = da.add_adapter(compiled, SMALL["hra"](), "a")  # the preset of the wrapped UNet
    assert names and not any("_orig_mod" in n for n in names)
    randomise(model, "a")
    inputs = tm.unet_inputs()
    with torch.no_grad():
        out = compiled(**inputs).sample
    da.save_adapter(compiled, tmp_path / "a", "a")
    plain = tm.tiny_unet()
    da.load_adapter(plain, tmp_path / "a", "a")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, out, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
