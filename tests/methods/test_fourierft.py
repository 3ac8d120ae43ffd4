"""FourierFT: outputs and files against PEFT, exactness of strength / identity / merge, gradients,
validation errors and torch.compile."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import FourierFTConfig as PeftFourierFTConfig
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from diffadapt.formats import peft as peft_format
from diffadapt.methods import get_method
from diffadapt.methods.base import AdapterConfigError, LayerSpec
from diffadapt.methods.fourierft import (
    FourierFT,
    FourierFTConfig,
    choose_path,
    delta_output_dense,
    delta_output_fft,
    rows_half,
)
from tests import contract

PATHS = ("dense", "fft")


class Wrap(nn.Module):
    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


def peft_model(layer, **kw):
    """A PEFT FourierFT model around ``layer`` (named "layer") with a random, non-zero spectrum."""
    torch.manual_seed(1)
    cfg = PeftFourierFTConfig(target_modules=["layer"], fan_in_fan_out=isinstance(layer, Conv1D), **kw)
    model = get_peft_model(Wrap(layer=layer), cfg)
    with torch.no_grad():
        model.base_model.model.layer.fourierft_spectrum["default"].copy_(torch.randn(cfg.n_frequency))
    return model


def load_from_peft(model, params, path="layer"):
    """Copy PEFT's saved tensors into ours through peft_format.keys("fourierft")."""
    state = get_peft_model_state_dict(model)
    with torch.no_grad():
        for ours, suffix in peft_format.keys("fourierft").items():
            params[ours].copy_(state[f"base_model.model.{path}.{suffix}"])


def reference_delta(spec: LayerSpec, coef: torch.Tensor, seed: int, scaling: float) -> torch.Tensor:
    """dW from the closed form (docs/design.md, FourierFT): scaling/(d_out d_in) * sum_m c_m cos(2 pi (j_m p/d_out + k_m q/d_in))."""
    d_out, d_in = spec.out_features, spec.fan_in
    idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[: coef.numel()]
    j, k = (idx // d_in).double(), (idx % d_in).double()
    p = torch.arange(d_out, dtype=torch.float64)[:, None, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (j * p / d_out + k * q / d_in)
    return scaling / (d_out * d_in) * (coef.double() * torch.cos(phase)).sum(-1)


# ---------------------------------------------------------------------------------------------
# 1. against PEFT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("d_in,d_out", [(24, 40), (21, 15)])
def test_matches_peft(kind, d_in, d_out):
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    if kind == "conv1d":
        nn.init.normal_(layer.bias)
    model = peft_model(layer, n_frequency=60, scaling=7.5, random_loc_seed=123)
    base = model.base_model.model.layer.base_layer
    x = torch.randn(2, 5, d_in)
    with torch.no_grad():
        y_peft = model(x)
        for path in (*PATHS, "auto"):
            cfg = FourierFTConfig(n_frequency=60, scaling=7.5, random_loc_seed=123, fast_path=path)
            spec, params, buffers = contract.init(FourierFT, cfg, base, name="layer")
            peft_layer = model.base_model.model.layer
            assert torch.equal(torch.stack([buffers["rows"], buffers["cols"]]), peft_layer.indices["default"])
            load_from_peft(model, params)
            assert params["fourierft_spectrum"].abs().min() > 0  # a non-identity adapter
            y = contract.forward(FourierFT, cfg, base, params, buffers, x)
            torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-6)
            y_merged = contract.merged_forward(FourierFT, cfg, base, params, buffers, x)
            torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-6)
            assert (y - base(x)).norm() > 0.1 * y.norm()  # the adapter changes the output a lot
        # PEFT's own merge gives the same effective weight as our apply_to_weight
        prep = FourierFT.prepare(cfg, params, buffers, 1.0)
        W0 = contract.weight_2d(base).clone()
        ours = FourierFT.apply_to_weight(W0, prep)
        assert not torch.allclose(ours, W0, atol=1e-2)
        merged = model.merge_and_unload().layer  # merges into `base` in place
        torch.testing.assert_close(ours, contract.weight_2d(merged), rtol=1e-5, atol=1e-6)


def test_conv2d_own_definition():
    """PEFT has no Conv2d: the grid is (out_channels, in_channels*kh*kw) over weight.flatten(1)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=(3, 2), padding=1)
    cfg = FourierFTConfig(n_frequency=40, scaling=20.0, random_loc_seed=5)
    spec, params, buffers = contract.init(FourierFT, cfg, conv, name="conv")
    assert spec.fan_in == 18
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        dW = reference_delta(spec, params["fourierft_spectrum"], 5, 20.0).float().reshape(conv.weight.shape)
        y_ref = F.conv2d(x, conv.weight + dW, conv.bias, padding=1)
        y = contract.forward(FourierFT, cfg, conv, params, buffers, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert (y - conv(x)).norm() > 0.1 * y.norm()
        torch.testing.assert_close(contract.merged_forward(FourierFT, cfg, conv, params, buffers, x), y)


@pytest.mark.parametrize("d_out,d_in", [(10, 12), (9, 7), (1, 6), (6, 1), (2, 2), (12, 3), (13, 2), (8, 2)])
def test_both_paths_equal_closed_form_float64(d_out, d_in):
    """The dense (irfft2, or for a tall layer the inverse FFT with the rows halved) and
    FFT-on-activations paths vs the cosine sum of docs/design.md, odd/even/1-wide."""
    assert rows_half(d_out, d_in, torch.device("cpu")) == (d_out >= 4 * d_in)  # both halvings are tested here
    torch.manual_seed(0)
    spec = LayerSpec("l", "linear", d_out, d_in)
    cfg = FourierFTConfig(n_frequency=min(9, d_out * d_in), scaling=3.0, random_loc_seed=11)
    params, buffers = FourierFT.init_layer(cfg, spec, torch.randn(d_out, d_in, dtype=torch.float64), {})
    dW = reference_delta(spec, params["fourierft_spectrum"], 11, 3.0)
    x = torch.randn(3, 4, d_in, dtype=torch.float64)
    prep = FourierFT.prepare(cfg, params, buffers, 1.0)
    for fn in (delta_output_dense, delta_output_fft):
        torch.testing.assert_close(fn(x, prep), x @ dW.T, rtol=1e-12, atol=1e-12)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    torch.testing.assert_close(FourierFT.apply_to_weight(W, prep), W + dW, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out,d_in", [(6, 5), (4, 8), (9, 2)])
def test_gradcheck(d_out, d_in):
    torch.manual_seed(0)
    spec = LayerSpec("l", "linear", d_out, d_in)
    cfg = FourierFTConfig(n_frequency=11, scaling=2.0)
    params, buffers = FourierFT.init_layer(cfg, spec, torch.zeros(d_out, d_in, dtype=torch.float64), {})
    c = params["fourierft_spectrum"].requires_grad_()
    x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    strength = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def run(fn):
        return lambda c, x, s: fn(x, FourierFT.prepare(cfg, {"fourierft_spectrum": c}, buffers, s))

    for fn in (delta_output_dense, delta_output_fft, FourierFT.delta_output):
        assert torch.autograd.gradcheck(run(fn), (c, x, strength))
    merged = lambda c, W, s: FourierFT.apply_to_weight(W, FourierFT.prepare(cfg, {"fourierft_spectrum": c}, buffers, s))
    assert torch.autograd.gradcheck(merged, (c, W, strength))


# ---------------------------------------------------------------------------------------------
# 3./4. identity, strength
# ---------------------------------------------------------------------------------------------
def test_identity_at_init_and_peft_default_is_not():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    x = torch.randn(4, 16)
    with torch.no_grad():
        for path in PATHS:
            cfg = FourierFTConfig(n_frequency=30, init_weights=True, fast_path=path)
            _, params, buffers = contract.init(FourierFT, cfg, layer)
            assert torch.equal(contract.forward(FourierFT, cfg, layer, params, buffers, x), layer(x))
            assert torch.equal(contract.merged_forward(FourierFT, cfg, layer, params, buffers, x), layer(x))
        cfg = FourierFTConfig(n_frequency=30)  # PEFT default init_weights=False: c ~ N(0, 1)
        assert cfg.init_weights is False
        _, params, buffers = contract.init(FourierFT, cfg, layer)
        assert params["fourierft_spectrum"].std() > 0.5
        assert not torch.allclose(contract.forward(FourierFT, cfg, layer, params, buffers, x), layer(x))


@pytest.mark.parametrize("path", PATHS)
def test_strength(path):
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    conv = nn.Conv2d(2, 4, 3)
    x, xc = torch.randn(4, 16), torch.randn(1, 2, 5, 5)
    cfg = FourierFTConfig(n_frequency=30, fast_path=path)
    with torch.no_grad():
        for mod, inp in ((layer, x), (conv, xc)):
            _, params, buffers = contract.init(FourierFT, cfg, mod)
            base = mod(inp)
            default = contract.forward(FourierFT, cfg, mod, params, buffers, inp)
            for zero in (0.0, torch.tensor(0.0)):
                assert torch.equal(contract.forward(FourierFT, cfg, mod, params, buffers, inp, strength=zero), base)
                merged = contract.merged_forward(FourierFT, cfg, mod, params, buffers, inp, strength=zero)
                assert torch.equal(merged, base)
            for one in (1.0, torch.tensor(1.0)):
                assert torch.equal(contract.forward(FourierFT, cfg, mod, params, buffers, inp, strength=one), default)
            # in between: linear in the update, W + a*dW
            half = contract.forward(FourierFT, cfg, mod, params, buffers, inp, strength=0.5)
            torch.testing.assert_close(half - base, 0.5 * (default - base), rtol=1e-5, atol=1e-5)
            neg = contract.merged_forward(FourierFT, cfg, mod, params, buffers, inp, strength=-2.0)
            torch.testing.assert_close(neg - base, -2.0 * (default - base), rtol=1e-4, atol=1e-4)


def test_bf16_activations():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    x = torch.randn(3, 32)
    cfg = FourierFTConfig(n_frequency=50, scaling=10.0)
    _, params, buffers = contract.init(FourierFT, cfg, layer)
    with torch.no_grad():
        prep = FourierFT.prepare(cfg, params, buffers, 1.0)
        ref = delta_output_dense(x, prep)
        for fn in (delta_output_dense, delta_output_fft):
            y = fn(x.bfloat16(), prep)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
        Wb = layer.weight.bfloat16()
        assert FourierFT.apply_to_weight(Wb, prep).dtype == torch.bfloat16
        assert torch.equal(FourierFT.apply_to_weight(Wb, FourierFT.prepare(cfg, params, buffers, 0.0)), Wb)


# ---------------------------------------------------------------------------------------------
# method specific: positions, per-layer n, path choice, PEFT files
# ---------------------------------------------------------------------------------------------
def test_positions_and_registry():
    assert get_method("fourierft") is FourierFT and FourierFT.config_class is FourierFTConfig
    j, k = FourierFT.positions(5, 7, 9, 777)
    idx = torch.randperm(63, generator=torch.Generator().manual_seed(777))[:5]
    assert torch.equal(j, idx // 9) and torch.equal(k, idx % 9)
    assert not torch.equal(FourierFT.positions(5, 7, 9, 778)[0] * 9 + FourierFT.positions(5, 7, 9, 778)[1], idx)


def test_choose_path():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_path(4096, 320, 320, 1000, cpu) == "dense"
    assert choose_path(4096, 640, 640, 1000, cpu) == "fft"
    assert choose_path(4096, 1280, 1280, 1000, cpu) == "fft"
    assert choose_path(4096, 1280, 1280, 1000, cuda) == "dense"
    assert choose_path(4096, 64, 64, 1000, cpu) == "dense"  # n >> d: gathers dominate
    assert choose_path(1, 1280, 1280, 1000, cpu) == "fft"  # one token: building dW dominates


def test_n_frequency_pattern_matches_peft():
    torch.manual_seed(0)
    model = get_peft_model(
        Wrap(a=nn.Linear(8, 8), b=nn.Linear(8, 8)),
        PeftFourierFTConfig(target_modules=["a", "b"], n_frequency=20, n_frequency_pattern={"b": 7}),
    )
    cfg = FourierFTConfig(n_frequency=20, n_frequency_pattern={"b": 7})
    for name in ("a", "b"):
        layer = getattr(model.base_model.model, name)
        spec, params, buffers = contract.init(FourierFT, cfg, layer.base_layer, name=name)
        assert params["fourierft_spectrum"].numel() == layer.fourierft_n_frequency["default"]
        assert torch.equal(torch.stack([buffers["rows"], buffers["cols"]]), layer.indices["default"])
    assert cfg.for_layer("blocks.3.b").n_frequency == 7 and cfg.for_layer("blocks.3.ab").n_frequency == 20
    # generic overrides apply after the PEFT pattern and win
    both = FourierFTConfig(n_frequency=20, n_frequency_pattern={"b": 7}, overrides={r".*\.b": {"n_frequency": 3}})
    assert both.for_layer("x.b").n_frequency == 3 and both.for_layer("b").n_frequency == 7


def test_overrides_export_to_peft_pattern():
    cfg = FourierFTConfig(
        n_frequency=20,
        n_frequency_pattern={"c": 5},
        overrides={"b": {"n_frequency": 7}, r"blk\.[01]\.a": {"n_frequency": 9}, r"blk\.0\.a": {"n_frequency": 4}},
    )
    exported = {k: v for k, v in peft_format.to_peft_dict(cfg).items() if k != "target_modules"}
    peft_cfg = PeftFourierFTConfig(target_modules=["a", "b", "c"], **exported)
    inner = Wrap(a=nn.Linear(8, 8), b=nn.Linear(8, 8), c=nn.Linear(8, 8))
    blk = nn.Module()
    blk.add_module("0", Wrap(a=nn.Linear(8, 8)))
    blk.add_module("1", Wrap(a=nn.Linear(8, 8)))
    inner.add_module("blk", blk)
    model = get_peft_model(inner, peft_cfg)
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "fourierft_n_frequency"):
            assert module.fourierft_n_frequency["default"] == cfg.for_layer(name).n_frequency, name
    back = peft_format.from_peft_dict("fourierft", peft_format.to_peft_dict(cfg))
    for name in ("a", "b", "c", "blk.0.a", "blk.1.a", "x.blk.0.a"):
        assert back.for_layer(name).n_frequency == cfg.for_layer(name).n_frequency, name


def test_peft_file_roundtrip(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    model = peft_model(layer, n_frequency=25, scaling=33.0, random_loc_seed=9)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = peft_format.from_peft_dict("fourierft", data)
    assert (cfg.n_frequency, cfg.scaling, cfg.random_loc_seed, cfg.init_weights) == (25, 33.0, 9, False)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == ["base_model.model.layer.fourierft_spectrum"]
    base = model.base_model.model.layer.base_layer
    _, params, buffers = contract.init(FourierFT, cfg, base, name="layer")
    with torch.no_grad():
        for ours, suffix in peft_format.keys("fourierft").items():
            params[ours].copy_(tensors[f"base_model.model.layer.{suffix}"])
        x = torch.randn(3, 12)
        y = contract.forward(FourierFT, cfg, base, params, buffers, x)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    # our export is a valid PEFT config and reads back unchanged
    out = peft_format.to_peft_dict(cfg)
    assert "peft_type" not in out and "fast_path" not in out and "overrides" not in out
    PeftFourierFTConfig(**out)
    assert peft_format.from_peft_dict("fourierft", out).to_dict() == cfg.to_dict()
    assert FourierFTConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# 5. validation errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_frequency": 0}, r"n_frequency=0 must be a positive integer"),
        ({"n_frequency": -3}, r"n_frequency=-3"),
        ({"n_frequency": 2.5}, r"n_frequency=2.5"),
        ({"n_frequency": True}, r"n_frequency=True"),
        ({"n_frequency_pattern": {"to_q": 0}}, r"n_frequency_pattern\['to_q'\]=0"),
        ({"scaling": float("nan")}, r"scaling=nan must be a finite number"),
        ({"scaling": "150"}, r"scaling='150'"),
        ({"random_loc_seed": None}, r"random_loc_seed=None must be an integer"),
        ({"fast_path": "gpu"}, r"fast_path='gpu'; choose one of auto, dense, fft"),
        ({"bias": "fourier_only"}, r"bias='fourier_only' is not supported"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(AdapterConfigError, match=match):
        FourierFTConfig(**kwargs)


def test_layer_errors():
    cfg = FourierFTConfig(n_frequency=13, n_frequency_pattern={"to_k": 30})
    msg = r"n_frequency=13 does not fit 'blocks.0.to_q' \[linear, weight 4x3\].*4\*3=12 entries. Lower n_frequency"
    with pytest.raises(AdapterConfigError, match=msg):
        cfg.check_layer(LayerSpec("blocks.0.to_q", "linear", 4, 3))
    cfg.check_layer(LayerSpec("blocks.0.to_q", "linear", 4, 4))  # 13 <= 16 fits
    with pytest.raises(AdapterConfigError, match=r"n_frequency=30 does not fit 'blocks.0.to_k'"):
        cfg.check_layer(LayerSpec("blocks.0.to_k", "linear", 4, 4))
    msg = r"'c' \[conv2d, weight 2x4 \(conv 1 channels, kernel 2x2\)\].*2\*4=8"
    with pytest.raises(AdapterConfigError, match=msg):
        cfg.check_layer(LayerSpec("c", "conv2d", 2, 1, (2, 2)))
    with pytest.raises(AdapterConfigError, match=r"cannot adapt 'e' \[embedding.*only linear, conv1d and conv2d"):
        cfg.check_layer(LayerSpec("e", "embedding", 100, 100))
    with pytest.raises(AdapterConfigError, match=r"does not fit 'layer'"):  # init goes through check_layer
        contract.init(FourierFT, FourierFTConfig(n_frequency=50), nn.Linear(3, 4))


def test_serialisation_errors():
    with pytest.raises(AdapterConfigError, match=r"override 'to_q' sets \['n_frequency', 'scaling'\].*only vary"):
        peft_format.to_peft_dict(FourierFTConfig(overrides={"to_q": {"scaling": 3.0, "n_frequency": 4}}))
    with pytest.raises(AdapterConfigError, match=r"fields diffadapt does not know: \['rank'\]"):
        peft_format.from_peft_dict("fourierft", {"peft_type": "FOURIERFT", "task_type": None, "rank": 4, "new_flag": None})
    with pytest.raises(AdapterConfigError, match=r"unknown config fields \['r'\]"):
        FourierFTConfig.from_dict({"r": 4})


# ---------------------------------------------------------------------------------------------
# 6. torch.compile
# ---------------------------------------------------------------------------------------------
class Adapted(nn.Module):
    def __init__(self, layer, cfg, params, buffers):
        super().__init__()
        self.layer, self.cfg, self.buffers = layer, cfg, buffers
        self.params = nn.ParameterDict(params)

    def forward(self, x, strength):
        params = {k: v for k, v in self.params.items()}
        return contract.forward(FourierFT, self.cfg, self.layer, params, self.buffers, x, strength)


def test_compile_fullgraph():
    torch.manual_seed(0)
    layer = nn.Linear(24, 20)
    x = torch.randn(2, 3, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor: "no code generation for complex operators"
        for path in PATHS:
            cfg = FourierFTConfig(n_frequency=40, fast_path=path)
            _, params, buffers = contract.init(FourierFT, cfg, layer)
            mod = Adapted(layer, cfg, params, buffers)
            compiled = torch.compile(mod, fullgraph=True)
            s = torch.tensor(0.8)
            y = compiled(x, s)
            torch.testing.assert_close(y, mod(x, s), rtol=1e-5, atol=1e-6)
            y.square().sum().backward()
            g = mod.params["fourierft_spectrum"].grad.clone()
            mod.zero_grad()
            mod(x, s).square().sum().backward()
            torch.testing.assert_close(g, mod.params["fourierft_spectrum"].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 10), (9, 7), (16, 33)])
def test_delta_weight_backward_is_the_adjoint_of_delta_weight(shape):
    """The closed-form adjoint the runtime uses in backward (no dW kept) against autograd, float64."""
    d_out, d_in = shape
    layer = torch.nn.Linear(d_in, d_out).double()
    cfg = FourierFTConfig(n_frequency=min(40, d_out * d_in), init_weights=False)
    _, params, buffers = contract.init(FourierFT, cfg, layer)
    prep = FourierFT.prepare(cfg, params, buffers, 0.7)
    prep = prep._replace(coef=prep.coef.detach().requires_grad_(True))  # the factor the runtime folds
    grad = torch.randn(d_out, d_in, dtype=torch.float64)
    (want,) = torch.autograd.grad(FourierFT.delta_weight(prep, torch.float64), prep.coef, grad)
    (got,) = FourierFT.delta_weight_backward(prep, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fft_path_keeps_an_input_sized_tensor_for_backward():
    """The FFT-on-activations path keeps rfft(x) (the input's size) for backward, not the gathered
    T x ~4n values (6x the input at d_in 640, n 1000); torch's rfft keeps x itself too. Gradients:
    gradcheck above."""
    torch.manual_seed(0)
    spec = LayerSpec("l", "linear", 96, 64)
    cfg = FourierFTConfig(n_frequency=1000, fast_path="fft")
    params, buffers = FourierFT.init_layer(cfg, spec, torch.zeros(96, 64), {})
    c = params["fourierft_spectrum"].requires_grad_()
    x = torch.randn(2, 50, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if t.dtype.is_floating_point else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = FourierFT.delta_output(x, FourierFT.prepare(cfg, {"fourierft_spectrum": c}, buffers, 1.0))
    big = [b for b in saved if b > 10_000]  # activation-sized (the parameters' few KB aside)
    assert big and sum(big) <= 2.1 * x.numel() * x.element_size() * (66 / 64), big  # x and rfft(x)
    y.square().sum().backward()
    assert c.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
