"""BOFT math: against PEFT (with the real butterfly factor count), gradients, strength, dropout, configs.

PEFT drops to one butterfly factor when its JIT CUDA extension cannot be built (always on CPU).
The fixture ``dense_butterfly`` hands PEFT a stand-in for that extension that builds the block
diagonal matrix densely, so PEFT's own dense formulation (permutation matrices, factor order)
runs with the requested factor count; the tests assert PEFT's ``boft_R`` really has ``m`` factors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from diffadapt.formats import peft as peft_format
from diffadapt.methods.base import AdapterConfigError, LayerSpec
from diffadapt.methods.boft import BOFT, BOFTConfig, butterfly_rotate
from tests import contract
from tests.contract import Holder

import peft.tuners.boft.layer as peft_boft_layer
from peft import BOFTConfig as PeftBOFTConfig
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict


# -- helpers (test_oft.py imports them) -----------------------------------------------------------


def peft_twin(method, peft_config, our_config, layer: nn.Module, randomize):
    """PEFT-wrap ``layer``, randomize PEFT's adapter params, copy them into ours via ``peft_keys``."""
    ours = copy.deepcopy(layer)
    pm = get_peft_model(Holder(layer), peft_config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                randomize(name, p)
    _, params, buffers = contract.init(method, our_config, ours)
    sd = get_peft_model_state_dict(pm)
    with torch.no_grad():
        for name, suffix in peft_format.keys(method.name).items():
            value = sd[f"base_model.model.layer.{suffix}"]
            assert value.shape == params[name].shape, (name, value.shape, params[name].shape)
            params[name].copy_(value)
    return pm, ours, params, buffers


def dense(method, prep, d: int) -> torch.Tensor:
    """The dense rotation R (d x d) of a prep, for tests only: rows of I @ R."""
    return method.rotate_input(torch.eye(d, dtype=prep.blocks.dtype), prep)


def make_layer(kind: str, fan_in: int, out: int = 6) -> nn.Module:
    if kind == "linear":
        return nn.Linear(fan_in, out)
    if kind == "conv1d":
        layer = Conv1D(out, fan_in)
        nn.init.normal_(layer.bias)
        return layer
    k = 1 if kind == "conv2d_1x1" else 3
    return nn.Conv2d(fan_in // (k * k), out, k, padding=k // 2)


def make_input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 5, 5)
    return torch.randn(2, 3, contract.layer_spec("x", layer).in_features)


def _randomize_boft(name, p):
    if "boft_R" in name:
        p.normal_(0.0, 0.5)
    else:
        p.normal_(1.0, 0.2)


def boft_twin(kind, fan_in, **kw):
    torch.manual_seed(0)
    layer = make_layer(kind, fan_in)
    peft_cfg = PeftBOFTConfig(target_modules=["layer"], init_weights=False, **kw)
    return peft_twin(BOFT, peft_cfg, BOFTConfig(**kw), layer, _randomize_boft) + (BOFTConfig(**kw),)


# -- 1. against PEFT --------------------------------------------------------------------------------
CASES = [  # (layer kind, fan_in, config)
    ("linear", 16, dict(boft_block_size=4)),
    ("linear", 16, dict(boft_block_size=4, boft_n_butterfly_factor=2)),
    ("linear", 16, dict(boft_block_size=2, boft_n_butterfly_factor=3)),
    ("linear", 24, dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3)),
    ("conv2d_1x1", 8, dict(boft_block_size=2, boft_n_butterfly_factor=2)),
    ("conv2d_3x3", 36, dict(boft_block_size=6)),
    ("conv2d_3x3", 72, dict(boft_block_size=6, boft_n_butterfly_factor=3)),
]


@pytest.mark.parametrize("kind,fan_in,kw", CASES)
def test_matches_peft(dense_butterfly, kind, fan_in, kw):
    pm, layer, params, buffers, cfg = boft_twin(kind, fan_in, **kw)
    peft_layer = pm.base_model.model.layer
    assert peft_layer.boft_R["default"].shape[0] == cfg.boft_n_butterfly_factor  # PEFT really uses m
    x = make_input(layer)
    with torch.no_grad():
        y_peft = pm(x)
        y = contract.forward(BOFT, cfg, layer, params, buffers, x)
        y_merged = contract.merged_forward(BOFT, cfg, layer, params, buffers, x)
        assert ((y_peft - layer(x)).norm() / layer(x).norm()) > 0.05  # the adapter does something
        torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-6)
        peft_layer.merge()
        torch.testing.assert_close(y_merged, pm(x), rtol=1e-5, atol=1e-6)


def test_conv1d_matches_peft_linear(dense_butterfly):
    """PEFT has no BOFT for Conv1D: our Conv1D equals PEFT on the nn.Linear holding weight.T."""
    torch.manual_seed(1)
    conv = make_layer("conv1d", 16)
    lin = nn.Linear(16, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    kw = dict(boft_block_size=4, boft_n_butterfly_factor=2)
    pm, _, params, buffers = peft_twin(
        BOFT, PeftBOFTConfig(target_modules=["layer"], init_weights=False, **kw), BOFTConfig(**kw), lin, _randomize_boft
    )
    assert pm.base_model.model.layer.boft_R["default"].shape[0] == 2
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = contract.forward(BOFT, BOFTConfig(**kw), conv, params, buffers, x)
        torch.testing.assert_close(y, pm(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(contract.merged_forward(BOFT, BOFTConfig(**kw), conv, params, buffers, x), y,
                                   rtol=1e-5, atol=1e-6)


def test_peft_cpu_fallback_file(monkeypatch):
    """PEFT without its extension trains one factor but its config says m: for_saved_factors fixes it."""
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)
    kw = dict(boft_block_size=4, boft_n_butterfly_factor=2)
    torch.manual_seed(2)
    layer = nn.Linear(16, 6)
    ours = copy.deepcopy(layer)
    pm = get_peft_model(Holder(layer), PeftBOFTConfig(target_modules=["layer"], init_weights=False, **kw))
    saved = get_peft_model_state_dict(pm)["base_model.model.layer.boft_R"]
    assert saved.shape == (1, 4, 4, 4)
    with pytest.warns(UserWarning, match="holds 1 factor"):
        cfg = peft_format.from_peft_dict("boft", pm.peft_config["default"].to_dict()).for_saved_factors(saved.shape[0])
    assert cfg.boft_n_butterfly_factor == 1
    _, params, buffers = contract.init(BOFT, cfg, ours)
    with torch.no_grad():
        params["boft_R"].copy_(saved)
        params["boft_s"].copy_(pm.base_model.model.layer.boft_s["default"])
        x = torch.randn(3, 16)
        torch.testing.assert_close(contract.forward(BOFT, cfg, ours, params, buffers, x), pm(x), rtol=1e-5, atol=1e-6)


# -- 2. gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,merged", [("linear", False), ("linear", True), ("conv2d", False)])
def test_gradcheck(kind, merged):
    torch.manual_seed(3)
    if kind == "linear":
        layer, x = nn.Linear(8, 3).double(), torch.randn(2, 8, dtype=torch.float64)
    else:  # a non-square kernel (PEFT has none): fan_in = 2 * 2 * 4
        layer, x = nn.Conv2d(2, 2, (2, 4)).double(), torch.randn(1, 2, 3, 5, dtype=torch.float64)
    cfg = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)
    _, params, buffers = contract.init(BOFT, cfg, layer)
    inputs = (params["boft_R"].detach().requires_grad_(), params["boft_s"].detach().requires_grad_(),
              x.requires_grad_())
    run = contract.merged_forward if merged else contract.forward

    def f(r, s, x):
        return run(BOFT, cfg, layer, {"boft_R": r, "boft_s": s}, buffers, x, strength=0.7)

    assert torch.autograd.gradcheck(f, inputs)


# -- 3./4. identity, strength, orthogonality ---------------------------------------------------------------
def _random_linear_adapter(m=2, b=4, d=16):
    torch.manual_seed(4)
    layer = nn.Linear(d, 6)
    cfg = BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, init_weights=False)
    _, params, buffers = contract.init(BOFT, cfg, layer)
    with torch.no_grad():
        params["boft_R"].normal_(0.0, 0.5)
    return cfg, layer, params, buffers


def _base(layer, x):
    return F.linear(x, layer.weight) + layer.bias  # the runtime's unfused order


def test_identity_at_init():
    torch.manual_seed(5)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2)
    for kind, fan_in in (("linear", 16), ("conv2d_3x3", 72)):
        layer = make_layer(kind, fan_in)
        _, params, buffers = contract.init(BOFT, cfg, layer)
        x = make_input(layer)
        with torch.no_grad():
            prep = BOFT.prepare(cfg, params, buffers, 1.0)
            assert torch.equal(BOFT.apply_to_weight(contract.weight_2d(layer), prep), contract.weight_2d(layer))
            if kind == "linear":
                assert torch.equal(BOFT.rotate_input(x, prep), x)
                assert torch.equal(contract.forward(BOFT, cfg, layer, params, buffers, x), _base(layer, x))
            else:
                assert torch.equal(contract.forward(BOFT, cfg, layer, params, buffers, x), layer(x))


@pytest.mark.parametrize("zero", [0.0, torch.tensor(0.0)])
def test_strength_zero_is_base_bit_exact(zero):
    cfg, layer, params, buffers = _random_linear_adapter()
    with torch.no_grad():
        params["boft_s"].normal_(1.0, 0.3)
        x = torch.randn(5, 16)
        prep = BOFT.prepare(cfg, params, buffers, zero)
        assert torch.equal(BOFT.rotate_input(x, prep), x)
        assert torch.equal(BOFT.output_scale(prep), torch.ones(6))
        assert torch.equal(BOFT.apply_to_weight(layer.weight, prep), layer.weight)
        assert torch.equal(contract.forward(BOFT, cfg, layer, params, buffers, x, strength=zero), _base(layer, x))


def test_strength_one_is_default_exactly_and_scale_is_lerp():
    cfg, layer, params, buffers = _random_linear_adapter()
    with torch.no_grad():
        params["boft_s"].normal_(1.0, 0.3)
        x = torch.randn(5, 16)
        y = contract.forward(BOFT, cfg, layer, params, buffers, x)
        assert torch.equal(contract.forward(BOFT, cfg, layer, params, buffers, x, strength=torch.tensor(1.0)), y)
        assert torch.equal(BOFT.output_scale(BOFT.prepare(cfg, params, buffers, 1.0)), params["boft_s"].reshape(-1))
        half = BOFT.output_scale(BOFT.prepare(cfg, params, buffers, 0.5))
        torch.testing.assert_close(half, 1 + 0.5 * (params["boft_s"].reshape(-1) - 1))
        assert not torch.allclose(contract.forward(BOFT, cfg, layer, params, buffers, x, strength=0.5), y)


@pytest.mark.parametrize("a", [0.3, 0.7, 2.0])
def test_strength_keeps_rotation_orthogonal(a):
    cfg, layer, params, buffers = _random_linear_adapter(m=3, b=2)
    with torch.no_grad():
        rot = dense(BOFT, BOFT.prepare(cfg, params, buffers, torch.tensor(a)), 16)
        rot1 = dense(BOFT, BOFT.prepare(cfg, params, buffers, 1.0), 16)
        assert (rot.T @ rot - torch.eye(16)).norm() < 1e-5
        assert (rot - torch.eye(16)).norm() > 0.1 and (rot - rot1).norm() > 0.1
        x = torch.randn(4, 16)
        torch.testing.assert_close(
            contract.merged_forward(BOFT, cfg, layer, params, buffers, x, strength=a),
            contract.forward(BOFT, cfg, layer, params, buffers, x, strength=a), rtol=1e-5, atol=1e-6)


def test_butterfly_matches_dense_definition():
    """R = M_{m-1}...M_0 with M_i = P_i blockdiag(Q_i) P_i^T and the permutation of docs/design.md (BOFT), built densely."""
    torch.manual_seed(6)
    m, n, b = 3, 8, 2
    d = n * b
    blocks = torch.linalg.qr(torch.randn(m, n, b, b, dtype=torch.float64))[0]
    rot = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        run, h = b * 2**i, b // 2
        order = []  # listing of one run: even chunks, then odd chunks
        for chunk in list(range(0, run // h, 2)) + list(range(1, run // h, 2)):
            order += range(chunk * h, chunk * h + h)
        perm = torch.cat([torch.tensor(order) + start for start in range(0, d, run)])
        p = torch.zeros(d, d, dtype=torch.float64)
        p[torch.arange(d), perm] = 1
        rot = p @ torch.block_diag(*blocks[i]) @ p.T @ rot
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(butterfly_rotate(x, blocks), x @ rot)
    torch.testing.assert_close(butterfly_rotate(x, blocks, transpose=True), x @ rot.T)


# -- dropout ----------------------------------------------------------------------------------------------
def test_dropout_replaces_blocks_of_one_factor_by_identity():
    torch.manual_seed(7)
    cfg = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5, init_weights=False)
    _, params, buffers = contract.init(BOFT, cfg, nn.Linear(16, 4))  # 8 blocks per factor -> 4 dropped
    eye = torch.eye(2)
    with torch.no_grad():
        full = BOFT.prepare(cfg, params, buffers, 1.0, training=False).blocks
        hit = set()
        for _ in range(20):
            dropped = BOFT.prepare(cfg, params, buffers, 1.0, training=True).blocks
            changed = (dropped != full).flatten(2).any(-1)  # (m, N)
            assert changed.sum() == 4 and changed.any(-1).sum() == 1
            assert torch.equal(dropped[changed], eye.expand(4, 2, 2))
            hit.add(int(changed.any(-1).nonzero()))
        assert hit == {0, 1}


# -- 5. validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(boft_block_size=0, boft_block_num=0), "exactly one of boft_block_size"),
    (dict(boft_block_size=4, boft_block_num=4), "exactly one of boft_block_size"),
    (dict(boft_block_size=-2), "boft_block_size must be an integer >= 0"),
    (dict(boft_block_size=2.5), "boft_block_size must be an integer"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be an integer >= 1"),
    (dict(boft_dropout=1.0), r"boft_dropout is a probability in \[0, 1\)"),
    (dict(bias="boft_only"), "bias='boft_only' is not supported"),
])
def test_config_errors(kw, match):
    with pytest.raises(AdapterConfigError, match=match):
        BOFTConfig(**kw)


@pytest.mark.parametrize("kw,spec,match", [
    (dict(boft_block_size=5), LayerSpec("blk.to_q", "linear", 8, 16), r"'blk.to_q' \[linear, weight 8x16\].*boft_block_size=5 does not divide fan_in=16"),
    (dict(boft_block_size=0, boft_block_num=5), LayerSpec("c", "conv2d", 8, 4, (3, 3)), r"kernel 3x3.*boft_block_num=5 does not divide fan_in=36"),
    (dict(boft_block_size=4, boft_n_butterfly_factor=3), LayerSpec("l", "linear", 8, 24), r"'l'.*needs an even block size and a block count divisible by 2\^2=4.*6 blocks of size 4"),
    (dict(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=3), LayerSpec("l", "linear", 8, 16), r"divisible by 2\^2=4.*2 blocks of size 8"),
    (dict(boft_block_size=3, boft_n_butterfly_factor=2), LayerSpec("l", "linear", 8, 12), r"even block size.*4 blocks of size 3"),
    (dict(boft_block_size=4, boft_n_butterfly_factor=2), LayerSpec("l", "linear", 8, 4), r"2\^1=2.*1 blocks of size 4"),
    (dict(), LayerSpec("emb", "embedding", 8, 16), r"BOFT cannot adapt 'emb'.*'embedding' is not one of"),
])
def test_layer_errors(kw, spec, match):
    with pytest.raises(AdapterConfigError, match=match):
        BOFTConfig(**kw).check_layer(spec)


def test_peft_config_round_trip():
    cfg = BOFTConfig(target_modules=["to_q", "to_v"], boft_block_size=0, boft_block_num=8,
                     boft_n_butterfly_factor=2, boft_dropout=0.1)
    d = peft_format.to_peft_dict(cfg)
    assert "peft_type" not in d and d["boft_block_num"] == 8 and d["boft_n_butterfly_factor"] == 2
    peft_cfg = PeftBOFTConfig(**d)  # PEFT accepts every field we write
    back = peft_format.from_peft_dict("boft", peft_cfg.to_dict())  # and we ignore its bookkeeping keys
    assert back == cfg
    with pytest.raises(AdapterConfigError, match="no per-layer settings"):
        peft_format.to_peft_dict(BOFTConfig(overrides={"to_q": {"boft_block_size": 8}}))


# -- 6. torch.compile ------------------------------------------------------------------------------------
def test_compile_fullgraph():
    cfg, layer, params, buffers = _random_linear_adapter(m=2, b=4)

    class Adapted(nn.Module):
        def forward(self, x, strength):
            return contract.forward(BOFT, cfg, layer, params, buffers, x, strength=strength)

    x = torch.randn(3, 16)
    compiled = torch.compile(Adapted(), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor(0.6)), Adapted()(x, torch.tensor(0.6)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", [False, True])  # alone: s folded into the base product; under another adapter: fused with the bias
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (2, 7, 5)])  # a 1-D input too
def test_runtime_fused_scale_matches_autograd_float64(bias, shape, inner, monkeypatch):
    """The runtime fuses BOFT's output scale on the activation path -- alone into the base product
    (``diag(s) W``), under another live adapter with the bias -- and keeps only the layer's output for
    backward (no y copy): outputs and every gradient equal plain autograd through W_eff, float64, with
    one scale exactly 0 (its channel gets no scale gradient: y is not recoverable there). (These few
    tokens would take the weight path: turned off here.)"""
    import diffadapt as da
    import diffadapt.host

    monkeypatch.setattr(diffadapt.host, "_WEIGHT_PATH_GAIN", 0.0)

    torch.manual_seed(0)
    layer = nn.Linear(8 if len(shape) > 1 else 8, 6, bias=bias).double()
    model = nn.Sequential(layer)
    cfg = BOFTConfig(target_modules=["0"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)
    da.add_adapter(model, cfg, "a")
    if inner:
        da.add_adapter(model, BOFTConfig(target_modules=["0"], boft_block_size=4, init_weights=False), "b")
        da.set_adapters(model, ["a", "b"])
    params = da.model.adapter_parameters(model, "a")
    for p in params.values():
        p.requires_grad_(True)  # (adding "b" made it the one being trained)
    s = next(p for k, p in params.items() if k.endswith("boft_s"))
    with torch.no_grad():
        s[2] = 0.0
    model.train()
    x = torch.randn(*shape[:-1], 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    leaves = [x, *params.values()]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    host = model[0]
    w_eff = host.base_layer.weight
    for name in (["a", "b"] if inner else ["a"])[::-1]:  # "a" outermost
        slot = host.adapters[name]
        w_eff = BOFT.apply_to_weight(w_eff, BOFT.prepare(slot.config, slot.params(), slot.buffers_dict(), 1.0))
    want_y = nn.functional.linear(x, w_eff, host.base_layer.bias)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(want_y, leaves, g)
    for name, a, b in zip(["x", *params], got, want):
        if name.endswith("boft_s"):
            assert a.reshape(-1)[2] == 0 and b.reshape(-1)[2] != 0
            a, b = a.reshape(-1)[[0, 1, 3, 4, 5]], b.reshape(-1)[[0, 1, 3, 4, 5]]
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_absurd_butterfly_factor_is_one_line():
    """boft_n_butterfly_factor=100000: refused naming the layer, without formatting 2^99999."""
    layer = LayerSpec("blocks.0.proj", "linear", 16, 16)
    with pytest.raises(AdapterConfigError, match=r"boft_n_butterfly_factor=100000 .*2\^99999,"):
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=100000).check_layer(layer)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("extra", [{}, {"constraint": 0.05}, {"boft_dropout": 0.5}])
def test_layers_of_several_widths_prepare_as_one_wide_batch(side, extra):
    """Linear and conv2d layers of four widths (one block size, two factors) share one stack_key;
    their wide batch gives every layer exactly its own factors (float64, values and gradients), and
    the constraint / dropout fall back to one stack per shape (dropout: same random draws)."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 8), nn.Linear(32, 16), nn.Linear(16, 8), nn.Conv2d(8, 24, 1), nn.Linear(64, 32)]
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side=side, **extra)
    inits = []
    for layer in layers:
        _, params, buffers = contract.init(BOFT, cfg, layer.double())
        with torch.no_grad():
            params["boft_R"].normal_(0.0, 0.5)
            params["boft_s"].normal_(1.0, 0.2)
        inits.append((params, buffers))
    assert len({BOFT.stack_key(p, b) for p, b in inits}) == 1
    strength = torch.tensor(0.7, dtype=torch.float64)
    training = "boft_dropout" in extra
    torch.manual_seed(1)
    batched = BOFT.prepare_many(cfg, [p for p, _ in inits], [b for _, b in inits], strength, training)
    torch.manual_seed(1)
    alone = []  # the per-shape stacks the fallback builds draw in the order of first appearance
    if training:
        shapes = [tuple(p["boft_R"].shape) + tuple(p["boft_s"].shape) for p, _ in inits]
        order = {s: i for i, s in enumerate(dict.fromkeys(shapes))}
        groups = {}
        for i, s in enumerate(shapes):
            groups.setdefault(s, []).append(i)
        by_index = {}
        for s in sorted(groups, key=order.get):
            idx = groups[s]
            for i, prep in zip(idx, BOFT.prepare_many(cfg, [inits[i][0] for i in idx], [inits[i][1] for i in idx], strength, True)):
                by_index[i] = prep
        alone = [by_index[i] for i in range(len(inits))]
    else:
        alone = [BOFT.prepare(cfg, p, b, strength) for p, b in inits]
    for one, many in zip(alone, batched):
        torch.testing.assert_close(many.blocks, one.blocks, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(many.rotation, one.rotation, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(many.scale, one.scale, rtol=0, atol=0)
        torch.testing.assert_close(many.inv_scale, one.inv_scale, rtol=0, atol=0)
    if training:
        return
    loss = lambda preps: sum((p.rotation.square() * (k + 1)).sum() + p.scale.sum() * k for k, p in enumerate(preps))  # noqa: E731
    params = [t for p, _ in inits for t in p.values()]
    g_many = torch.autograd.grad(loss(batched), params)
    g_one = torch.autograd.grad(loss([BOFT.prepare(cfg, p, b, strength) for p, b in inits]), params)
    for a, b in zip(g_many, g_one):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_output_scale_fused_where_the_weight_is_smaller_else_applied_to_the_output(monkeypatch):
    """BOFT's trained scale s goes into the base product (ScaledLinear, diag(s) W) when the layer sees at least
    d_in tokens, else onto the output (ScaleBias: scaling a 64 x 32 weight for 4 tokens costs 16x the output's
    numbers): both give the same outputs and gradients (float64), each taken where the rule says (on the
    activation path: the weight path, which 96 tokens would take here, turned off)."""
    import diffadapt as da
    import diffadapt.host as host_module

    monkeypatch.setattr(host_module, "_WEIGHT_PATH_GAIN", 0.0)
    seen, rule = [], host_module._FUSED_SCALE_TOKENS
    for name in ("ScaledLinear", "ScaleBias"):
        cls = getattr(host_module, name)
        monkeypatch.setattr(host_module, name, type(name, (), {"apply": staticmethod(
            lambda *a, _cls=cls, _name=name: seen.append(_name) or _cls.apply(*a))}))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32)).double().requires_grad_(False)
    da.add_adapter(base, BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2), "a")
    params = da.adapter_parameters(base, "a")
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)
    for tokens, want in ((4, "ScaleBias"), (96, "ScaledLinear")):
        x = torch.randn(tokens, 64, dtype=torch.float64, requires_grad=True)
        results = []
        for fused in (rule, 0, 1 << 20):  # the rule, always fused, never fused
            monkeypatch.setattr(host_module, "_FUSED_SCALE_TOKENS", fused)
            seen.clear()
            y = base(x)
            grads = torch.autograd.grad(y.square().sum(), (x, *params.values()))
            results.append((y.detach(), grads, list(seen)))
        assert results[0][2] == [want] and results[1][2] == ["ScaledLinear"] and results[2][2] == ["ScaleBias"]
        for y, grads, _ in results[1:]:
            torch.testing.assert_close(y, results[0][0], rtol=1e-12, atol=1e-12)
            for a, b in zip(grads, results[0][1]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
