"""HRA math: against PEFT, against a dense float64 reference, gradients, strength, configs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from diffadapt.formats import peft as peft_format
from diffadapt.methods.base import AdapterConfigError, LayerSpec
from diffadapt.methods.hra import HRA, HRAConfig, wy_factors
from tests import contract
from tests.contract import Holder

peft = pytest.importorskip("peft")
from peft import HRAConfig as PeftHRAConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402




def make_layer(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(24, 10)
    if kind == "conv2d_1x1":
        return nn.Conv2d(12, 7, 1)
    if kind == "conv2d_3x3":
        return nn.Conv2d(4, 6, 3, padding=1, stride=2)
    raise ValueError(kind)


def make_input(kind: str) -> torch.Tensor:
    if kind == "linear":
        return torch.randn(2, 5, 24)
    if kind == "conv2d_1x1":
        return torch.randn(2, 12, 5, 5)
    return torch.randn(2, 4, 7, 7)


def peft_and_ours(layer: nn.Module, r: int, gs: bool):
    """PEFT-wrap a copy of ``layer`` with random hra_u; load the same values into our params."""
    ours = copy.deepcopy(layer)
    pm = get_peft_model(Holder(layer), PeftHRAConfig(r=r, apply_GS=gs, init_weights=False, target_modules=["layer"]))
    with torch.no_grad():
        pm.base_model.model.layer.hra_u["default"].normal_()
    cfg = HRAConfig(r=r, apply_GS=gs, init_weights=False)
    spec, params, buffers = contract.init(HRA, cfg, ours)
    sd = get_peft_model_state_dict(pm)
    with torch.no_grad():
        for name, suffix in peft_format.keys("hra").items():
            value = sd[f"base_model.model.layer.{suffix}"]
            assert value.shape == params[name].shape
            params[name].copy_(value)
    return pm, cfg, ours, params, buffers


def dense_q(u: torch.Tensor, gs: bool) -> torch.Tensor:
    """Reference Q built as a dense matrix, straight from the definition (float64)."""
    d, r = u.shape
    eye = torch.eye(d, dtype=u.dtype)
    if gs:
        basis = []
        for i in range(r):
            v = u[:, i].clone()
            for b in basis:
                v = v - (b @ v) * b
            basis.append(v / v.norm())
        b = torch.stack(basis, 1)
        return eye - 2 * b @ b.T
    q = eye
    for i in range(r):
        y = u[:, i] / u[:, i].norm()
        q = q @ (eye - 2 * torch.outer(y, y))
    return q


# -- 1. against PEFT ----------------------------------------------------------------------------
@pytest.mark.parametrize("gs", [False, True])
@pytest.mark.parametrize("kind,r", [("linear", 4), ("linear", 6), ("conv2d_1x1", 4), ("conv2d_3x3", 4)])
def test_matches_peft_and_merge(kind, r, gs):
    torch.manual_seed(0)
    pm, cfg, ours, params, buffers = peft_and_ours(make_layer(kind), r, gs)
    x = make_input(kind)
    with torch.no_grad():
        ref = pm(x)
        base = ours(x)
        y = contract.forward(HRA, cfg, ours, params, buffers, x)
        merged = contract.merged_forward(HRA, cfg, ours, params, buffers, x)
    assert (ref - base).norm() > 0.1 * base.norm()  # the adapter really changes the layer
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, y, rtol=1e-5, atol=1e-6)


def test_conv1d_matches_peft_linear():
    """PEFT has no Conv1D HRA: our Conv1D must equal PEFT on the equivalent nn.Linear."""
    torch.manual_seed(1)
    lin = nn.Linear(24, 10)
    pm, cfg, _, params, buffers = peft_and_ours(lin, 4, False)
    conv1d = Conv1D(10, 24)
    with torch.no_grad():
        conv1d.weight.copy_(pm.base_model.model.layer.base_layer.weight.T)
        conv1d.bias.copy_(pm.base_model.model.layer.base_layer.bias)
    x = torch.randn(3, 24)
    with torch.no_grad():
        ref = pm(x)
        y = contract.forward(HRA, cfg, conv1d, params, buffers, x)
        merged = contract.merged_forward(HRA, cfg, conv1d, params, buffers, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        get_peft_model(Holder(Conv1D(4, 8)), PeftHRAConfig(r=2, target_modules=["layer"]))


# -- dense float64 reference --------------------------------------------------------------------
@pytest.mark.parametrize("gs,d,r", [(False, 9, 5), (False, 3, 4), (True, 9, 5), (True, 4, 4)])
def test_wy_form_equals_dense_definition(gs, d, r):
    torch.manual_seed(2)
    u = torch.randn(d, r, dtype=torch.float64)
    q = dense_q(u, gs)
    eye = torch.eye(d, dtype=torch.float64)
    prep = HRA.prepare(HRAConfig(r=r, apply_GS=gs, init_weights=False), {"hra_u": u}, {}, 1.0)
    torch.testing.assert_close(HRA.apply_to_weight(eye, prep), q, rtol=0, atol=1e-12)  # I Q
    torch.testing.assert_close(HRA.rotate_input(eye, prep), q.T, rtol=0, atol=1e-12)  # I Q^T
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
    # strength a: Q_a = (1 - a) I + a Q, not orthogonal in between
    prep = HRA.prepare(HRAConfig(r=r, apply_GS=gs, init_weights=False), {"hra_u": u}, {}, 0.3)
    qa = HRA.apply_to_weight(eye, prep)
    torch.testing.assert_close(qa, 0.7 * eye + 0.3 * q, rtol=0, atol=1e-12)
    assert (qa.T @ qa - eye).abs().max() > 1e-3


@pytest.mark.parametrize("gs", [False, True])
def test_nearly_collinear_vectors_stay_accurate(gs):
    """fp32 factors of badly conditioned U (columns within 1e-3 of one direction) vs float64.

    A Gram-matrix route (Cholesky of U^T U) squares the condition number and is off by ~0.5 here.
    """
    torch.manual_seed(12)
    u = torch.randn(64, 1) + 1e-3 * torch.randn(64, 8)
    prep = HRA.prepare(HRAConfig(r=8, apply_GS=gs, init_weights=False), {"hra_u": u}, {}, 1.0)
    err = (HRA.apply_to_weight(torch.eye(64), prep).double() - dense_q(u.double(), gs)).abs().max()
    assert err < 1e-3


def test_t_matches_column_recurrence():
    """T^{-1} = I/2 + striu(Y^T Y) equals the recurrence T_ii = 2, T[:i,i] = -2 T[:i,:i] Y[:,:i]^T y_i."""
    torch.manual_seed(3)
    u = torch.randn(11, 6, dtype=torch.float64)
    y, v = wy_factors(u, apply_gs=False)
    t_ours = torch.linalg.pinv(y) @ v
    t = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(6):
        t[i, i] = 2
        t[:i, i] = -2 * t[:i, :i] @ (y[:, :i].T @ y[:, i])
    torch.testing.assert_close(t_ours, t, rtol=0, atol=1e-12)


def test_batched_factors_equal_single():
    torch.manual_seed(4)
    u = torch.randn(3, 10, 4)
    for gs in (False, True):
        yb, vb = wy_factors(u, gs, 0.5)
        for i in range(3):
            y, v = wy_factors(u[i], gs, 0.5)
            torch.testing.assert_close(yb[i], y, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(vb[i], v, rtol=1e-5, atol=1e-6)


# -- 2. gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("gs", [False, True])
def test_gradcheck(gs):
    torch.manual_seed(5)
    cfg = HRAConfig(r=4, apply_GS=gs, init_weights=False)
    u = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def rot(u, x, a):
        return HRA.rotate_input(x, HRA.prepare(cfg, {"hra_u": u}, {}, a))

    def weight(u, w, a):
        return HRA.apply_to_weight(w, HRA.prepare(cfg, {"hra_u": u}, {}, a))

    assert torch.autograd.gradcheck(rot, (u, x, a))
    assert torch.autograd.gradcheck(weight, (u, w, a))


# -- 3. identity at init ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d_3x3"])
def test_identity_at_init(kind):
    torch.manual_seed(6)
    layer = Conv1D(10, 24) if kind == "conv1d" else make_layer(kind)
    x = torch.randn(3, 24) if kind == "conv1d" else make_input(kind)
    cfg = HRAConfig(r=6)
    spec, params, buffers = contract.init(HRA, cfg, layer)
    u = params["hra_u"]
    assert u.shape == (spec.fan_in, 6) and u.dtype == torch.float32
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and not torch.equal(u[:, 0], u[:, 2])
    with torch.no_grad():
        torch.testing.assert_close(contract.forward(HRA, cfg, layer, params, buffers, x), layer(x), rtol=0, atol=2e-6)
    # the same shape as PEFT's parameter (PEFT: in_channels * k * k for square kernels)
    if kind == "conv2d_3x3":
        pm = get_peft_model(Holder(copy.deepcopy(layer)), PeftHRAConfig(r=6, target_modules=["layer"]))
        assert pm.base_model.model.layer.hra_u["default"].shape == u.shape


def test_random_init_is_not_identity():
    torch.manual_seed(7)
    cfg = HRAConfig(r=3, init_weights=False)
    lin = nn.Linear(8, 4)
    _, params, buffers = contract.init(HRA, cfg, lin)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert (contract.forward(HRA, cfg, lin, params, buffers, x) - lin(x)).abs().max() > 1e-2


# -- 4. strength --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d_3x3"])
@pytest.mark.parametrize("gs", [False, True])
def test_strength_zero_and_one(kind, gs):
    torch.manual_seed(8)
    layer = Conv1D(10, 24) if kind == "conv1d" else make_layer(kind)
    x = torch.randn(3, 24) if kind == "conv1d" else make_input(kind)
    cfg = HRAConfig(r=4, apply_GS=gs, init_weights=False)
    _, params, buffers = contract.init(HRA, cfg, layer)
    with torch.no_grad():
        base = layer(x)
        fwd = lambda s: contract.forward(HRA, cfg, layer, params, buffers, x, s)  # noqa: E731
        merged = lambda s: contract.merged_forward(HRA, cfg, layer, params, buffers, x, s)  # noqa: E731
        w = contract.weight_2d(layer)
        for zero in (0.0, torch.tensor(0.0)):
            assert torch.equal(fwd(zero), base)
            # merging at strength 0 writes W back bit for bit (Conv1D's own addmm layout differs
            # from contract.merged_forward's F.linear in the last bit, so compare weights there)
            assert torch.equal(HRA.apply_to_weight(w, HRA.prepare(cfg, params, buffers, zero)), w)
            if kind != "conv1d":
                assert torch.equal(merged(zero), base)
        full = contract.forward(HRA, cfg, layer, params, buffers, x)
        assert torch.equal(fwd(1.0), full) and torch.equal(fwd(torch.tensor(1.0)), full)
        assert (full - base).abs().max() > 1e-2
        half = fwd(0.5)  # straight line between base and adapter: y_a = (1 - a) y_0 + a y_1
        torch.testing.assert_close(half, 0.5 * (base + full), rtol=1e-5, atol=1e-5)


def test_odd_kernel_and_grouped_conv():
    """Beyond PEFT: non-square kernels and groups > 1 (fan_in = in_channels / groups * kh * kw)."""
    torch.manual_seed(9)
    for conv in (nn.Conv2d(4, 6, (3, 1), padding=(1, 0)), nn.Conv2d(4, 6, 3, groups=2, dilation=2)):
        cfg = HRAConfig(r=4, init_weights=False)
        spec, params, buffers = contract.init(HRA, cfg, conv)
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            q = dense_q(params["hra_u"].double(), False).float()
            ref = conv._conv_forward(x, (conv.weight.flatten(1) @ q).reshape(conv.weight.shape), conv.bias)
            torch.testing.assert_close(contract.forward(HRA, cfg, conv, params, buffers, x), ref, rtol=1e-5, atol=1e-5)


def test_low_precision_activations():
    torch.manual_seed(10)
    cfg = HRAConfig(r=4, init_weights=False)
    lin = nn.Linear(32, 8)
    _, params, _ = contract.init(HRA, cfg, lin)
    prep = HRA.prepare(cfg, params, {}, 1.0)
    x = torch.randn(4, 32)
    z = HRA.rotate_input(x.bfloat16(), prep)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), HRA.rotate_input(x, prep), rtol=2e-2, atol=2e-2)
    assert HRA.apply_to_weight(lin.weight.detach().bfloat16(), prep).dtype == torch.bfloat16


# -- 5. validation ------------------------------------------------------------------------------
def test_config_errors():
    for bad in (0, -2, 2.0, True):
        with pytest.raises(AdapterConfigError, match="r must be a positive integer"):
            HRAConfig(r=bad)
    with pytest.raises(AdapterConfigError, match=r"needs an even r .*r=7.*r=8.*init_weights=False"):
        HRAConfig(r=7)
    with pytest.raises(AdapterConfigError, match=r"got r=1\. Use an even r such as r=2"):
        HRAConfig(r=1)
    with pytest.raises(AdapterConfigError, match=r"apply_GS=True with init_weights=True.*init_weights=False"):
        HRAConfig(r=4, apply_GS=True)
    with pytest.raises(AdapterConfigError, match="bias='all'"):
        HRAConfig(bias="all")
    with pytest.raises(AdapterConfigError, match=r"override 'to_q': .*r=5"):  # refused when made, not per layer
        HRAConfig(r=4, overrides={"to_q": {"r": 5}})
    cfg = HRAConfig(r=4, overrides={"to_q": {"r": 6}})
    assert cfg.for_layer("blocks.0.to_q").r == 6
    with pytest.raises(AdapterConfigError, match="no per-layer settings"):
        peft_format.to_peft_dict(cfg)


def test_layer_errors():
    cfg = HRAConfig(r=6, apply_GS=True, init_weights=False)
    conv = LayerSpec("unet.conv_in", "conv2d", 8, 1, (2, 2))
    with pytest.raises(AdapterConfigError, match=r"'unet.conv_in' \[conv2d, weight 8x4.*r=6.*fan_in=4"):
        cfg.check_layer(conv)
    HRAConfig(r=6, init_weights=False).check_layer(conv)  # a Householder chain may have r > fan_in
    with pytest.raises(AdapterConfigError, match=r"'emb' .*kind 'embedding'"):
        cfg.check_layer(LayerSpec("emb", "embedding", 4, 100))
    with pytest.raises(AdapterConfigError, match="fan_in=4"):
        contract.init(HRA, cfg, nn.Conv2d(1, 8, 2))


def test_peft_config_round_trip():
    cfg = HRAConfig(r=4, target_modules=["to_q", "to_v"], exclude_modules="x.*")
    d = peft_format.to_peft_dict(cfg)
    assert d == {
        "r": 4, "apply_GS": False, "init_weights": True, "bias": "none", "target_modules": ["to_q", "to_v"],
        "exclude_modules": "x.*", "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    }
    pc = PeftHRAConfig(**d)
    saved = pc.to_dict()
    assert saved["peft_type"] == "HRA" and "task_type" in saved
    back = peft_format.from_peft_dict("hra", saved)
    assert back == cfg
    # PEFT allows init_weights=True with odd r / apply_GS (and then starts elsewhere): load as False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd = peft_format.from_peft_dict("hra", PeftHRAConfig(r=5, target_modules=["to_q"]).to_dict())
        gs = peft_format.from_peft_dict("hra", PeftHRAConfig(r=4, apply_GS=True, target_modules=["to_q"]).to_dict())
    assert (odd.r, odd.init_weights) == (5, False)
    assert (gs.apply_GS, gs.init_weights) == (True, False)


# -- 6. torch.compile ---------------------------------------------------------------------------
def test_compile_fullgraph():
    torch.manual_seed(11)
    lin = nn.Linear(16, 8)
    cfgs = (HRAConfig(r=4, init_weights=False), HRAConfig(r=4, apply_GS=True, init_weights=False))
    params = [contract.init(HRA, c, lin)[1]["hra_u"] for c in cfgs]

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.u0, self.u1 = lin, params[0], params[1]

        def forward(self, x, a):
            y0 = contract.forward(HRA, cfgs[0], self.lin, {"hra_u": self.u0}, {}, x, a)
            return y0 + contract.forward(HRA, cfgs[1], self.lin, {"hra_u": self.u1}, {}, x, a)

    model = Both()
    x, a = torch.randn(2, 3, 16), torch.tensor(0.8)
    eager = model(x, a)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), model.u0)
    compiled = torch.compile(model, fullgraph=True)(x, a)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), model.u0)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)
