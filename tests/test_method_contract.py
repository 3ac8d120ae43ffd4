"""The method contract (diffadapt/methods/base.py), checked the same way for every registered
method -- PEFT's shared test class over a config table. A method joins by having a small config
in ``SMALL`` (tests/test_runtime.py, declared once) and a refused value in ``BAD``;
tests/test_dummy_method.py runs the same checks on a method registered from outside.

* strength 0 is the base model bit for bit (and strength 1 is not);
* merge equals the live forward, unmerge restores every tensor bit for bit;
* a save / load round trip gives the same outputs, bit for bit;
* the batched ``prepare_many`` over layers of one ``stack_key`` equals each layer's own math;
* a bad config value is refused when the config is made, naming the config and the field.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffadapt as da
from diffadapt.methods import METHOD_NAMES, AdapterConfigError, get_method
from tests import contract
from tests.test_runtime import SMALL, assert_state_equal, randomise, state

# a value each method's config refuses: (field, value)
BAD = {
    "fourierft": ("n_frequency", 0),
    "boft": ("boft_dropout", 1.5),
    "oft": ("oft_block_size", -1),
    "hra": ("r", 0),
    "frod": ("sparse_rate", 2.0),
}
TARGETS = ["proj"]  # blocks.{0,1,2}.proj: three 16 x 16 layers, one stack_key group of three


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(16, 16)}) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block["proj"](x))
        return x


def chain() -> nn.Module:
    torch.manual_seed(0)
    return Chain().double()


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def adapted(make_config) -> tuple[nn.Module, nn.Module]:
    """(the chain with adapter "a", randomised, at strength 0.7; an untouched copy of the base)."""
    model = chain()
    base = copy.deepcopy(model)
    da.add_adapter(model, make_config(target_modules=TARGETS), "a")
    randomise(model, "a", seed=2)
    da.set_adapters(model, ["a"], [0.7])
    return model, base


# -- the checks (also run by tests/test_dummy_method.py) --------------------------------------------
def check_strength_zero_is_base(make_config) -> None:
    model, base = adapted(make_config)
    with torch.no_grad():
        assert not torch.allclose(model(X), base(X)), "the randomised adapter changes nothing"
        da.set_adapters(model, ["a"], [0.0])
        assert torch.equal(model(X), base(X))


def check_merge_unmerge(make_config) -> None:
    model, _ = adapted(make_config)
    before = state(model)
    with torch.no_grad():
        live = model(X)
        da.merge_adapters(model)
        torch.testing.assert_close(model(X), live, rtol=1e-10, atol=1e-12)
        da.unmerge_adapters(model)
        assert_state_equal(model, before)
        assert torch.equal(model(X), live)


def check_save_load(make_config, folder) -> None:
    model, base = adapted(make_config)
    path = da.save_adapter(model, folder, "a")
    da.load_adapter(base, path, "b")
    da.set_adapters(base, ["b"], [0.7])
    with torch.no_grad():
        assert torch.equal(base(X), model(X))


def check_batched_prepare(name: str, make_config) -> None:
    """``prepare_many`` over three layers of one stack_key == each layer through ``prepare`` (G = 1),
    through the weight (merge) form; and the live form == the weight form per layer."""
    method, config = get_method(name), make_config()
    torch.manual_seed(3)
    layers = [nn.Linear(16, 16).double() for _ in range(3)]
    inits = [contract.init(method, config, layer, f"layer{i}") for i, layer in enumerate(layers)]
    with torch.no_grad():
        for _, params, _ in inits:
            for p in params.values():
                p.add_(torch.randn_like(p) * 0.1)
    assert len({method.stack_key(p, b) for _, p, b in inits}) == 1, "equal layers must share one stack_key"
    batched = method.prepare_many(config, [p for _, p, _ in inits], [b for _, _, b in inits], 0.7)
    with torch.no_grad():
        for layer, (_, params, buffers), prep in zip(layers, inits, batched):
            single = contract.merged_forward(method, config, layer, params, buffers, X, 0.7)
            together = F.linear(X, method.apply_to_weight(contract.weight_2d(layer), prep), layer.bias)
            torch.testing.assert_close(together, single, rtol=1e-12, atol=1e-13)
            live = contract.forward(method, config, layer, params, buffers, X, 0.7)
            torch.testing.assert_close(live, single, rtol=1e-10, atol=1e-12)


def check_bad_value_names_field(make_config, field: str, value) -> None:
    config = make_config()
    with pytest.raises(AdapterConfigError) as err:
        dataclasses.replace(config, **{field: value})
    assert field in str(err.value) and type(config).__name__ in str(err.value), str(err.value)


# -- every registered built-in method ---------------------------------------------------------------
def test_tables_cover_every_method():
    assert set(SMALL) == set(METHOD_NAMES) == set(BAD)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_strength_zero_is_base(name):
    check_strength_zero_is_base(SMALL[name])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_merge_equals_live_and_unmerge_is_exact(name):
    check_merge_unmerge(SMALL[name])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_save_load_round_trip(name, tmp_path):
    check_save_load(SMALL[name], tmp_path / "a")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_batched_prepare_equals_per_layer_math(name):
    check_batched_prepare(name, SMALL[name])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bad_value_is_refused_naming_the_field(name):
    check_bad_value_names_field(SMALL[name], *BAD[name])


def test_frod_save_of_a_sequential_mlp(tmp_path):
    """``mlp.0`` and ``mlp.2`` share one basis (role 'mlp', one shape) that PEFT keys twice
    (categories 'mlp_0', 'mlp_2'): the file holds each key's own copy and loading shares it again."""
    from safetensors.torch import load_file

    from diffadapt.model import hosts

    model = nn.Sequential()
    model.mlp = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).double()
    base = copy.deepcopy(model)
    da.add_adapter(model, SMALL["frod"](target_modules=["mlp.0", "mlp.2"]), "a")
    randomise(model, "a", seed=2)
    path = da.save_adapter(model, tmp_path / "a", "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for field in ("V", "s_indices"):
        assert torch.equal(saved[f"base_model.frod_{field}.mlp_0"], saved[f"base_model.frod_{field}.mlp_2"])
    with torch.no_grad():
        before = base(X)
    da.load_adapter(base, path, "b")
    slots = [host.adapters["b"] for _, host in hosts(base)]
    assert len(slots) == 2 and slots[0].buffers_dict()["V"] is slots[1].buffers_dict()["V"]
    da.set_adapters(model, ["a"], [0.7])
    da.set_adapters(base, ["b"], [0.7])
    with torch.no_grad():
        assert not torch.allclose(model(X), before)
        assert torch.equal(base(X), model(X))
