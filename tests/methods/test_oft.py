"""OFT math: against PEFT (both Cayley forms, COFT, block sharing), gradients, strength, configs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffadapt.formats import peft as peft_format
from diffadapt.methods import _orthogonal
from diffadapt.methods._orthogonal import block_inverse, cayley
from diffadapt.methods.base import AdapterConfigError, LayerSpec
from diffadapt.methods.oft import OFT, OFTConfig, neumann, nearest_divisor
from tests import contract
from tests.methods.test_boft import Holder, dense, make_input, make_layer, peft_twin

from peft import OFTConfig as PeftOFTConfig
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict


def _randomize(std):
    def randomize(name, p):
        p.normal_(0.0, std)
    return randomize


def oft_twin(kind, fan_in, std=0.3, **kw):
    torch.manual_seed(0)
    layer = make_layer(kind, fan_in)
    peft_cfg = PeftOFTConfig(target_modules=["layer"], init_weights=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and our block-size adjustment notices
        pm, ours, params, buffers = peft_twin(OFT, peft_cfg, OFTConfig(**kw), layer, _randomize(std))
    return pm, ours, params, buffers, OFTConfig(**kw)


# -- 1. against PEFT --------------------------------------------------------------------------------
CASES = [  # (layer kind, fan_in, config)
    ("linear", 16, dict(oft_block_size=4, use_cayley_neumann=False)),
    ("linear", 16, dict(oft_block_size=4, use_cayley_neumann=True)),
    ("linear", 16, dict(oft_block_size=4, use_cayley_neumann=True, num_cayley_neumann_terms=3)),
    ("linear", 16, dict(oft_block_size=4, use_cayley_neumann=True, num_cayley_neumann_terms=8)),
    ("linear", 18, dict(oft_block_size=0, r=3, use_cayley_neumann=False)),
    ("linear", 12, dict(oft_block_size=5, use_cayley_neumann=False)),  # PEFT adjusts b to 6
    ("linear", 16, dict(oft_block_size=4, block_share=True, use_cayley_neumann=False)),
    ("linear", 16, dict(oft_block_size=4, coft=True, eps=0.3, use_cayley_neumann=False)),
    ("linear", 16, dict(oft_block_size=8, coft=True, eps=0.5, block_share=True, use_cayley_neumann=True)),
    ("conv2d_1x1", 8, dict(oft_block_size=4, use_cayley_neumann=False)),
    ("conv2d_1x1", 8, dict(oft_block_size=2, use_cayley_neumann=True)),
    # blocks of 32 / 40 rows: the CPU's recursive block inverse (block_inverse), leaves of 16 / 10
    ("linear", 64, dict(oft_block_size=32, use_cayley_neumann=False)),
    ("linear", 80, dict(oft_block_size=40, coft=True, eps=0.5, use_cayley_neumann=False)),
]


@pytest.mark.parametrize("kind,fan_in,kw", CASES)
def test_matches_peft(kind, fan_in, kw):
    pm, layer, params, buffers, cfg = oft_twin(kind, fan_in, **kw)
    x = make_input(layer)
    with torch.no_grad():
        y = contract.forward(OFT, cfg, layer, params, buffers, x)  # before PEFT's in-place COFT projection
        y_peft = pm(x)
        y_merged = contract.merged_forward(OFT, cfg, layer, params, buffers, x)
        assert ((y_peft - layer(x)).norm() / layer(x).norm()) > 0.02  # the adapter does something
        torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neumann_form", [False, True])
def test_conv3x3_matches_peft_merge(neumann_form):
    """PEFT's un-merged 3x3 OFT (unfold/rotate/fold) is not conv(x, W R^T); its merge is, and so are we."""
    pm, layer, params, buffers, cfg = oft_twin("conv2d_3x3", 36, oft_block_size=6, use_cayley_neumann=neumann_form)
    x = make_input(layer)
    with torch.no_grad():
        y = contract.forward(OFT, cfg, layer, params, buffers, x)
        pm.base_model.model.layer.merge()
        torch.testing.assert_close(y, pm(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(contract.merged_forward(OFT, cfg, layer, params, buffers, x), y, rtol=1e-5, atol=1e-6)


def test_conv1d_matches_peft_linear():
    """PEFT has no OFT for Conv1D: our Conv1D equals PEFT on the nn.Linear holding weight.T."""
    torch.manual_seed(1)
    conv = make_layer("conv1d", 16)
    lin = nn.Linear(16, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    kw = dict(oft_block_size=4, use_cayley_neumann=True)
    pm, _, params, buffers = peft_twin(OFT, PeftOFTConfig(target_modules=["layer"], **kw), OFTConfig(**kw), lin,
                                       _randomize(0.3))
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(contract.forward(OFT, OFTConfig(**kw), conv, params, buffers, x), pm(x),
                                   rtol=1e-5, atol=1e-6)


def test_default_config_saved_for_peft_computes_the_same():
    """Our default is exact Cayley; the PEFT config we write says so, and PEFT then agrees with us."""
    cfg = OFTConfig(oft_block_size=4, target_modules=["layer"])
    assert cfg.use_cayley_neumann is False and peft_format.to_peft_dict(cfg)["use_cayley_neumann"] is False
    assert PeftOFTConfig().use_cayley_neumann is True  # ... while PEFT's own default differs
    torch.manual_seed(2)
    layer = nn.Linear(16, 6)
    pm, ours, params, buffers = peft_twin(OFT, PeftOFTConfig(**peft_format.to_peft_dict(cfg)), cfg, layer, _randomize(0.3))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(contract.forward(OFT, cfg, ours, params, buffers, x), pm(x), rtol=1e-5, atol=1e-6)


def test_neumann_is_transpose_of_exact_cayley():
    torch.manual_seed(3)
    u = torch.randn(4, 6, 6, dtype=torch.float64).triu(1) * 0.05
    skew = u - u.mT
    exact = cayley(skew)
    series = neumann(skew, 30)
    torch.testing.assert_close(series, exact.mT, rtol=0, atol=1e-12)
    assert (series - exact).abs().max() > 0.05  # ... and not the matrix itself
    err5, err3 = ((neumann(skew, n) - exact.mT).abs().max() for n in (5, 3))
    assert err5 < 2e-3 and err5 < err3 / 2  # PEFT's 5 terms: approximately, truncation O(|S|^4)


@pytest.mark.parametrize("n", [17, 32, 37, 64, 100])
@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_block_inverse_of_identity_plus_skew(n, scale):
    """The unpivoted recursive inverse equals LAPACK's pivoted one for I + S (S skew), odd splits
    included: from small rotations to ones far from the identity (scale 1: |S|_2 7-20, every plane
    turned 164-174 degrees; scale 3: |S|_2 22-60). Float64 to 1e-11; float32 within 1e-6 of the
    float64 inverse up to scale 1 (LAPACK's float32 LU: 1-3e-7), within 5e-6 at scale 3 (its error
    grows as eps |S|^2 where the LU's grows as eps |S|)."""
    torch.manual_seed(n)
    u = torch.randn(5, n, n, dtype=torch.float64).triu(1) * scale
    m = torch.eye(n, dtype=torch.float64) + u - u.mT
    ref = torch.linalg.inv(m)
    torch.testing.assert_close(block_inverse(m), ref, rtol=0, atol=1e-11)
    x32 = block_inverse(m.float()).double()
    assert (x32 - ref).abs().max() < (1e-6 if scale <= 1.0 else 5e-6)


def test_cayley_of_wide_blocks_is_orthogonal_and_matches_inv_with_its_gradient():
    """cayley() of 32-wide blocks on the CPU (block_inverse inside one node with inv's adjoint) against
    autograd through the inv_ex form: values and gradients, float64; gradcheck of both paths (20-wide
    blocks: inv_ex, and one split into two leaves of 10 when the threshold is lowered)."""
    torch.manual_seed(8)
    u = (torch.randn(3, 2, 32, 32, dtype=torch.float64).triu(1) * 0.3).requires_grad_()
    assert 32 >= _orthogonal._BLOCK_INVERSE_MIN_SIZE
    q = cayley(u - u.mT)
    eye = torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(q @ q.mT, eye.expand_as(q), rtol=0, atol=1e-12)
    ref = 2.0 * torch.linalg.inv_ex(eye + u - u.mT)[0] - eye
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-12)
    w = torch.randn_like(q)
    (g,) = torch.autograd.grad((q * w).sum(), u)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), u)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)
    small = (torch.randn(2, 20, 20, dtype=torch.float64).triu(1) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cayley(t - t.mT), (small,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_orthogonal, "_BLOCK_INVERSE_MIN_SIZE", 20)  # 20 wide: one split into two leaves of 10
        assert torch.autograd.gradcheck(lambda t: cayley(t - t.mT), (small,))


def test_cayley_keeps_float32_under_bf16_autocast():
    """Mixed-precision training runs the blocks' inverse in float32: under CPU bf16 autocast the
    32-wide blocks (block_inverse's matmuls) and the 8-wide ones (inv_ex) agree with float64 to
    float32 rounding, values and gradients (bf16 matmuls would be off by ~1e-2)."""
    torch.manual_seed(9)
    for b in (32, 8):
        u = (torch.randn(6, b, b).triu(1) * 0.1).requires_grad_()
        w = torch.randn(6, b, b)
        ref = cayley((u - u.mT).double())
        (g_ref,) = torch.autograd.grad((ref * w.double()).sum(), u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = cayley(u - u.mT)
            (g,) = torch.autograd.grad((q * w).sum(), u)
        assert q.dtype == torch.float32 and g.dtype == torch.float32
        assert (q.double() - ref).abs().max() < 2e-6
        assert (g.double() - g_ref).abs().max() < 2e-5 * g_ref.abs().max()


# -- 2. gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,merged", [
    (dict(oft_block_size=4), False),
    (dict(oft_block_size=4), True),
    (dict(oft_block_size=4, use_cayley_neumann=True), False),
    (dict(oft_block_size=4, coft=True, eps=0.2, block_share=True), False),
])
def test_gradcheck(kw, merged):
    torch.manual_seed(4)
    layer = nn.Linear(8, 3).double()
    cfg = OFTConfig(init_weights=False, **kw)
    _, params, buffers = contract.init(OFT, cfg, layer)
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    vec = params["oft_R"].detach().requires_grad_()
    run = contract.merged_forward if merged else contract.forward

    def f(vec, x):
        return run(OFT, cfg, layer, {"oft_R": vec}, buffers, x, strength=0.8)

    assert torch.autograd.gradcheck(f, (vec, x))


def test_gradcheck_conv2d():
    torch.manual_seed(5)
    layer = make_layer("conv2d_3x3", 18, out=2).double()
    cfg = OFTConfig(oft_block_size=6, init_weights=False)
    _, params, buffers = contract.init(OFT, cfg, layer)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    vec = params["oft_R"].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, x: contract.forward(OFT, cfg, layer, {"oft_R": v}, buffers, x), (vec, x))


# -- 3./4. identity, strength, orthogonality ---------------------------------------------------------------
def _random_adapter(**kw):
    torch.manual_seed(6)
    layer = nn.Linear(16, 6)
    cfg = OFTConfig(init_weights=False, **{"oft_block_size": 4, **kw})
    _, params, buffers = contract.init(OFT, cfg, layer)
    with torch.no_grad():
        params["oft_R"].normal_(0.0, 0.3)
    return cfg, layer, params, buffers


def _base(layer, x):
    return F.linear(x, layer.weight) + layer.bias  # the runtime's unfused order


@pytest.mark.parametrize("neumann_form", [False, True])
def test_identity_at_init(neumann_form):
    torch.manual_seed(7)
    cfg = OFTConfig(oft_block_size=4, use_cayley_neumann=neumann_form)
    for kind, fan_in in (("linear", 16), ("conv2d_3x3", 36)):
        layer = make_layer(kind, fan_in)
        _, params, buffers = contract.init(OFT, cfg, layer)
        x = make_input(layer)
        with torch.no_grad():
            prep = OFT.prepare(cfg, params, buffers, 1.0)
            assert OFT.output_scale(prep) is None
            assert torch.equal(OFT.apply_to_weight(contract.weight_2d(layer), prep), contract.weight_2d(layer))
            if kind == "linear":
                assert torch.equal(contract.forward(OFT, cfg, layer, params, buffers, x), _base(layer, x))
            else:
                assert torch.equal(contract.forward(OFT, cfg, layer, params, buffers, x), layer(x))


@pytest.mark.parametrize("zero", [0.0, torch.tensor(0.0)])
@pytest.mark.parametrize("kw", [dict(), dict(use_cayley_neumann=True), dict(coft=True, eps=0.5)])
def test_strength_zero_and_one(zero, kw):
    cfg, layer, params, buffers = _random_adapter(**kw)
    x = torch.randn(5, 16)
    with torch.no_grad():
        prep = OFT.prepare(cfg, params, buffers, zero)
        assert torch.equal(OFT.rotate_input(x, prep), x)
        assert torch.equal(OFT.apply_to_weight(layer.weight, prep), layer.weight)
        assert torch.equal(contract.forward(OFT, cfg, layer, params, buffers, x, strength=zero), _base(layer, x))
        y = contract.forward(OFT, cfg, layer, params, buffers, x)
        assert torch.equal(contract.forward(OFT, cfg, layer, params, buffers, x, strength=torch.tensor(1.0)), y)
        assert not torch.allclose(y, _base(layer, x))


@pytest.mark.parametrize("a", [0.3, 0.7, 2.0])
def test_strength_keeps_rotation_orthogonal(a):
    cfg, layer, params, buffers = _random_adapter()
    with torch.no_grad():
        rot = dense(OFT, OFT.prepare(cfg, params, buffers, torch.tensor(a)), 16)
        rot1 = dense(OFT, OFT.prepare(cfg, params, buffers, 1.0), 16)
        assert (rot.T @ rot - torch.eye(16)).norm() < 1e-5
        assert (rot - torch.eye(16)).norm() > 0.1 and (rot - rot1).norm() > 0.1
        x = torch.randn(4, 16)
        torch.testing.assert_close(contract.merged_forward(OFT, cfg, layer, params, buffers, x, strength=a),
                                   contract.forward(OFT, cfg, layer, params, buffers, x, strength=a),
                                   rtol=1e-5, atol=1e-6)


def test_coft_limits_the_rotation():
    cfg, layer, params, buffers = _random_adapter(coft=True, eps=0.4)
    with torch.no_grad():
        blocks = OFT.prepare(cfg, params, buffers, 1.0).blocks[0]
        skew = (blocks - blocks.mT) / 2  # Cayley: skew part of Q grows with |S|; bounded by the radius
        radius = 0.4 / 2  # eps / sqrt(4 blocks)
        unconstrained = OFT.prepare(OFTConfig(oft_block_size=4), params, buffers, 1.0).blocks[0]
        assert (skew.flatten(1).norm(dim=1) <= 2 * radius + 1e-6).all()
        assert ((unconstrained - unconstrained.mT) / 2).flatten(1).norm(dim=1).max() > 2 * radius


# -- dropout ----------------------------------------------------------------------------------------------
def test_module_dropout_replaces_blocks_by_identity():
    torch.manual_seed(8)
    cfg = OFTConfig(oft_block_size=2, module_dropout=0.25, init_weights=False)
    _, params, buffers = contract.init(OFT, cfg, nn.Linear(16, 4))  # 8 blocks -> 2 dropped
    with torch.no_grad():
        full = OFT.prepare(cfg, params, buffers, 1.0).blocks
        for _ in range(5):
            dropped = OFT.prepare(cfg, params, buffers, 1.0, training=True).blocks
            changed = (dropped != full).flatten(2).any(-1)
            assert changed.sum() == 2
            assert torch.equal(dropped[changed], torch.eye(2).expand(2, 2, 2))
        shared = OFTConfig(oft_block_size=2, module_dropout=0.5, block_share=True, init_weights=False)
        _, params, buffers = contract.init(OFT, shared, nn.Linear(16, 4))
        assert torch.equal(OFT.prepare(shared, params, buffers, 1.0, training=True).blocks,
                           OFT.prepare(shared, params, buffers, 1.0).blocks)  # PEFT: no dropout on a shared block


# -- 5. validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(r=0, oft_block_size=0), "exactly one of r"),
    (dict(r=4, oft_block_size=32), "exactly one of r"),
    (dict(oft_block_size=-4), "oft_block_size must be an integer >= 0"),
    (dict(r=True, oft_block_size=0), "r must be an integer"),
    (dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms must be an integer >= 1"),
    (dict(module_dropout=-0.1), r"module_dropout is a probability in \[0, 1\)"),
    (dict(coft=True, eps=0.0), "coft=True needs a positive eps"),
    (dict(bias="oft_only"), "bias='oft_only' is not supported"),
])
def test_config_errors(kw, match):
    with pytest.raises(AdapterConfigError, match=match):
        OFTConfig(**kw)


def test_layer_kind_error_and_peft_adjustment():
    with pytest.raises(AdapterConfigError, match=r"OFT cannot adapt 'emb'.*'embedding' is not one of"):
        OFTConfig().check_layer(LayerSpec("emb", "embedding", 8, 16))
    with pytest.warns(UserWarning, match=r"'conv_in' \[conv2d, weight 8x4.*oft_block_size=32 does not divide fan_in=4; using oft_block_size=4"):
        assert OFTConfig().layout(LayerSpec("conv_in", "conv2d", 8, 4, (1, 1))) == (1, 4)
    with pytest.warns(UserWarning, match="r=7 does not divide fan_in=36; using r=6"):
        assert OFTConfig(r=7, oft_block_size=0).layout(LayerSpec("l", "linear", 8, 36)) == (6, 6)
    assert [nearest_divisor(12, p) for p in (5, 7, 11, 40)] == [4, 6, 12, 12]


def test_peft_config_round_trip():
    cfg = OFTConfig(target_modules=["to_q"], oft_block_size=16, coft=True, eps=1e-4, block_share=True)
    d = peft_format.to_peft_dict(cfg)
    assert "peft_type" not in d and d["use_cayley_neumann"] is False and d["oft_block_size"] == 16
    assert peft_format.from_peft_dict("oft", PeftOFTConfig(**d).to_dict()) == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        missing = peft_format.from_peft_dict("oft", {"oft_block_size": 8, "r": 0, "peft_version": "0.21.2", "peft_type": "OFT"})
    assert missing.use_cayley_neumann is True  # what PEFT computes for a file without the field
    with pytest.warns(UserWarning, match="PEFT 0.18 changed that series"):
        peft_format.from_peft_dict("oft", {"oft_block_size": 8, "r": 0, "use_cayley_neumann": True, "peft_version": "0.17.1"})
    with pytest.raises(AdapterConfigError, match="no oft_block_size.*PEFT < 0.14"):
        peft_format.from_peft_dict("oft", {"r": 8, "peft_type": "OFT"})
    with pytest.raises(AdapterConfigError, match="no per-layer settings"):
        peft_format.to_peft_dict(OFTConfig(overrides={"to_q": {"oft_block_size": 8}}))


def test_peft_file_round_trip_through_state_dict():
    """Saved PEFT state dict -> our params by peft_keys, packed order and shapes included (block_share)."""
    kw = dict(oft_block_size=4, block_share=True, use_cayley_neumann=True)
    torch.manual_seed(9)
    pm = get_peft_model(Holder(nn.Linear(16, 6)), PeftOFTConfig(target_modules=["layer"], init_weights=False, **kw))
    sd = get_peft_model_state_dict(pm)
    _, params, buffers = contract.init(OFT, OFTConfig(**kw), nn.Linear(16, 6))
    assert set(sd) == {f"base_model.model.layer.{peft_format.keys('oft')['oft_R']}"}
    assert sd["base_model.model.layer.oft_R.weight"].shape == params["oft_R"].shape == (1, 6)


# -- 6. torch.compile ------------------------------------------------------------------------------------
def test_compile_fullgraph():
    cfg, layer, params, buffers = _random_adapter(coft=True, eps=0.5)

    class Adapted(nn.Module):
        def forward(self, x, strength):
            return contract.forward(OFT, cfg, layer, params, buffers, x, strength=strength)

    x = torch.randn(3, 16)
    compiled = torch.compile(Adapted(), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor(0.6)), Adapted()(x, torch.tensor(0.6)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d_in,block", [(24, 2), (24, 4), (48, 8), (20, 4), (12, 4), (64, 32)])
@pytest.mark.parametrize("share", [False, True])
def test_merge_bmm_equals_the_training_form_float64(d_in, block, share):
    """Merging (no grad) writes W R^T straight into a contiguous weight, small blocks grouped into
    block-diagonal ones up to 16 wide (24/2: 12 blocks as 3 of width 8; 24/4: 6 as 3 of 8; 48/8: 6
    as 3 of 16; 20/4 and 12/4: odd counts and 64/32: not grouped); the same numbers as the autograd
    form, float64."""
    torch.manual_seed(0)
    cfg = OFTConfig(oft_block_size=block, r=0, init_weights=False, block_share=share)
    W = torch.randn(6, d_in, dtype=torch.float64)
    params, buffers = OFT.init_layer(cfg, LayerSpec("l", "linear", 6, d_in), W, {})
    params = {k: v.double() for k, v in params.items()}
    prep = OFT.prepare(cfg, params, buffers, 0.9)
    with torch.no_grad():
        merged = OFT.apply_to_weight(W, prep)
    trained = OFT.apply_to_weight(W.clone().requires_grad_(True), prep)
    assert merged.is_contiguous() and not torch.equal(merged, W)
    torch.testing.assert_close(merged, trained.detach(), rtol=1e-12, atol=1e-12)
