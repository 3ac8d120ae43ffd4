"""Adapters on quantized base layers (bitsandbytes Linear4bit NF4/FP4, with and without double
quantization, and Linear8bitLt int8), against the same adapter on the dequantized float weight
(float32): live outputs and gradients, merge (requantize, reported error) / unmerge (storage bit
for bit), refused merges, unsupported quantized types, and files identical to a float base's.

bitsandbytes' CPU kernels compute in float32 with the dequantized weight under autograd / in train
mode, which is where the float reference is exact; in eval without autograd its Linear8bitLt
quantizes activations (LLM.int8) and, on AVX512-BF16 CPUs, Linear4bit switches to a bf16 kernel:
there the adapters are checked against the layer's own function (see test_inference_*).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import diffadapt as da
from diffadapt import quantized as Q
from tests import tiny_models as tm
from tests.quant_helpers import (
    TOL,
    add_both,
    check_forward_backward,
    mlp,
    mlp_input,
    randomise_both,
    saved_files_match_float,
    with_reference,
)
from tests.test_runtime import SMALL, randomise, rel

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'diffadapt[quantized]')")

QTYPES = {
    "nf4": dict(quant_type="nf4", double_quant=False),
    "nf4-dq": dict(quant_type="nf4", double_quant=True),
    "fp4-dq": dict(quant_type="fp4", double_quant=True),
    "int8": dict(quant_type="int8"),
}


def _quantize_layers(qtype):
    def run(model, names):
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Q.quantize_linear(model.get_submodule(name), **QTYPES[qtype]))
    return run


def quantize(model: nn.Module, names, qtype: str) -> tuple[nn.Module, nn.Module]:
    """``model`` with the Linear layers ``names`` quantized, and its float32 reference: a copy whose
    layers compute with the dequantized weights."""
    return with_reference(model, names, _quantize_layers(qtype))


def small(qtype, train=True):
    quant, ref = quantize(mlp(), ["0", "2"], qtype)
    return quant.train(train), ref.train(train)


# -- 1. live adapters on quantized layers ---------------------------------------------------------
@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("method", list(SMALL))
def test_live_adapter_equals_float_reference(method, qtype):
    quant, ref = small(qtype)
    add_both(quant, ref, method, target_modules=["0", "2"])
    assert all(isinstance(h.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for _, h in da.model.hosts(quant))
    check_forward_backward(quant, ref, mlp_input, lambda y: y)


def test_two_adapters_rotation_and_delta_with_bias_on_quantized():
    """A BOFT (output scale: the bias is taken out around it) before a FourierFT (additive after it)."""
    quant, ref = small("nf4-dq")
    add_both(quant, ref, "boft", "b", target_modules=["0", "2"])
    add_both(quant, ref, "fourierft", "f", target_modules=["0", "2"])
    for m in (quant, ref):
        da.set_adapters(m, ["b", "f"], [0.7, 1.0])
    check_forward_backward(quant, ref, mlp_input, lambda y: y)


UNET_TARGETS = r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"


def tiny_unet_quantized(qtype):
    import re

    unet = tm.tiny_unet(widths=(32,))
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(UNET_TARGETS, n)]
    quant, ref = quantize(unet, names, qtype)
    return quant.train(), ref.train(), names


@pytest.mark.parametrize("qtype", ["nf4-dq", "fp4-dq", "int8"])
def test_tiny_unet_with_quantized_layers_equals_float_reference(qtype):
    """Every method live at once on a tiny UNet whose attention and ff Linear layers are quantized.
    Each adapted layer, on the input it sees inside the UNet, gives the float reference layer's
    output, input gradient and adapter-parameter gradients within 1e-5. The UNet's output: within
    1e-3, the float32 noise floor of this five-adapter stack (measured, nf4-dq: quantized vs float32
    reference 3.0e-5 output / 2.4e-4 input gradient, float32 reference vs float64 1.5e-4 / 2.4e-3)."""
    quant, ref, names = tiny_unet_quantized(qtype)
    for method in SMALL:
        for m in (quant, ref):
            torch.manual_seed(7)
            assert da.add_adapter(m, SMALL[method](), method, preset="attention+ff") == names
        randomise_both(quant, ref, method, scale=0.05)
    for m in (quant, ref):
        da.set_adapters(m, list(SMALL))
        for method in SMALL:
            for p in da.adapter_parameters(m, method).values():
                p.requires_grad_(True)
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, args[0].detach())
        return hook

    hooks = [h.register_forward_hook(keep(n)) for n, h in da.model.hosts(quant)]
    with torch.no_grad():
        yq, yr = quant(**tm.unet_inputs()).sample, ref(**tm.unet_inputs()).sample
    for h in hooks:
        h.remove()
    assert rel(yq, yr) < 1e-3 and set(seen) == set(names)
    worst = 0.0
    for m in (quant, ref):
        m._diffadapt._key = None  # fresh factors with autograd, kept (retain_graph) for every layer below
        m._diffadapt.ensure_prepared(True)
    for name, x in seen.items():
        outs = []
        for m in (quant, ref):
            host = m.get_submodule(name)
            xi = x.clone().requires_grad_(True)
            y = host(xi)
            params = list(host.adapters.parameters())
            upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
            outs.append((y, torch.autograd.grad(y, [xi, *params], upstream, retain_graph=True)))
        (yq, gq), (yr, gr) = outs
        worst = max(worst, rel(yq, yr), *(rel(a, b) for a, b in zip(gq, gr) if b.norm() > 0))
    assert worst < TOL, worst


def test_no_dequantization_per_step(monkeypatch):
    """The live forward (train, eval, no-grad) never dequantizes: the quantized layer runs as a module."""
    quant, ref = small("nf4-dq")
    add_both(quant, ref, "frod", target_modules=["0", "2"])
    calls = []
    real = Q.dequantize
    monkeypatch.setattr(Q, "dequantize", lambda s: calls.append(1) or real(s))
    x = mlp_input()["input"]
    quant(x).sum().backward()
    quant.eval()
    with torch.no_grad():
        quant(x), quant(x)
    assert calls == []


@pytest.mark.parametrize("qtype", ["nf4-dq", "int8"])
def test_inference_runs_the_layers_own_kernel(qtype):
    """Eval without autograd: bitsandbytes' own inference kernels (LLM.int8 activations, the bf16
    CPU 4-bit kernel) run; the adapter on top stays within their error of the float reference and is
    exactly the adapter applied around the layer's own function."""
    quant, ref = small(qtype, train=False)
    add_both(quant, ref, "boft", target_modules=["0"])
    x = mlp_input()["input"]
    with torch.no_grad():
        yq, yr = quant(x), ref(x)
        assert rel(yq, yr) < 3e-2
        host = quant[0]
        preps = quant._diffadapt.steps_for(host)
        ((method, prep),) = preps
        z = method.rotate_input(x, prep)
        own = method.transform_output(host.base_layer(z) - host.base_layer.bias, prep) + host.base_layer.bias
        assert rel(host(x), own) < TOL


# -- 2. merging into quantized layers ---------------------------------------------------------------
def _storage_state(layer):
    s = Q.storage(layer)
    if s.kind == Q.BNB_INT8:
        return {"CB": s.data.clone(), "SCB": s.meta.clone()}
    out = {"data": s.data.clone()}
    out.update({k: v.clone() for k, v in s.meta.as_dict(packed=True).items() if isinstance(v, torch.Tensor)})
    return out


def _assert_same_storage(layer, before):
    now = _storage_state(layer)
    assert set(now) == set(before)
    for k in before:
        assert now[k].dtype == before[k].dtype and torch.equal(now[k], before[k]), k


@pytest.mark.parametrize("qtype", ["nf4-dq", "fp4-dq", "int8"])
@pytest.mark.parametrize("method", ["hra", "fourierft", "frod"])
def test_merge_requantizes_reports_and_unmerge_restores_bits(method, qtype):
    quant, ref = small(qtype, train=True)  # train mode: bitsandbytes' exact dequantize+matmul kernels
    add_both(quant, ref, method, target_modules=["0", "2"])
    before = {n: _storage_state(quant.get_submodule(n).base_layer) for n in ("0", "2")}
    x = mlp_input()["input"]
    with torch.no_grad():
        live = quant(x)
    exact = {n: ref.get_submodule(n).effective_weight().detach() for n in ("0", "2")}  # float32 W_eff
    with pytest.warns(Q.QuantizedMergeWarning, match=r"Merging requantized '(0|2)' \(bitsandbytes .*relative weight error"):
        da.merge_adapters(quant)
    report = Q.merge_report(quant)
    assert set(report) == {"0", "2"}
    for n in ("0", "2"):
        host = quant.get_submodule(n)
        merged_w = Q.dequantized_weight(host.base_layer).float()
        err = rel(merged_w, exact[n])  # against the adapter on the float reference
        assert abs(report[n].relative_error - err) < 1e-4 * err + 1e-7
        assert err < (0.2 if qtype != "int8" else 0.02)
        # what runs is the requantized weight exactly: a float layer with it computes the same
        with torch.no_grad():
            z = torch.randn(3, host.spec.in_features)
            assert rel(host(z), nn.functional.linear(z, merged_w, host.base_layer.bias)) < TOL
    da.unmerge_adapters(quant)
    assert Q.merge_report(quant) == {}
    for n in ("0", "2"):
        _assert_same_storage(quant.get_submodule(n).base_layer, before[n])
    with torch.no_grad():
        assert torch.equal(quant(x), live)


def test_merge_switch_and_partial_merge_restore_bits():
    quant, ref = small("nf4-dq", train=True)
    add_both(quant, ref, "hra", "h", target_modules=["0", "2"])
    add_both(quant, ref, "fourierft", "f", target_modules=["0", "2"])
    before = {n: _storage_state(quant.get_submodule(n).base_layer) for n in ("0", "2")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Q.QuantizedMergeWarning)
        da.set_adapters(quant, ["h", "f"])
        da.merge_adapters(quant, ["f"])  # innermost; h stays live on the requantized layer
        host = quant.get_submodule("0")
        w_merged = Q.dequantized_weight(host.base_layer)
        x = torch.randn(2, 64)
        ((method, prep),) = quant._diffadapt.steps_for(host)
        want = nn.functional.linear(method.rotate_input(x, prep), w_merged, host.base_layer.bias)
        assert rel(host(x), want) < TOL
        da.set_adapters(quant, "h")  # a partial merge stays partial: f drops out, h live
        for n in ("0", "2"):
            _assert_same_storage(quant.get_submodule(n).base_layer, before[n])
        da.set_adapters(quant, ["h", "f"])
        da.merge_adapters(quant)
        da.set_adapters(quant, "f")  # merge-switch
        da.set_adapters(quant, "h")
    da.unmerge_adapters(quant)
    for n in ("0", "2"):
        _assert_same_storage(quant.get_submodule(n).base_layer, before[n])


def test_merge_that_rounding_would_erase_is_refused_before_anything_changes():
    quant, _ = small("nf4-dq", train=True)
    torch.manual_seed(7)
    da.add_adapter(quant, SMALL["fourierft"](target_modules=["0", "2"]), "tiny")
    with torch.no_grad():
        for p in da.adapter_parameters(quant, "tiny").values():
            p.fill_(1e-6)  # a change far below a 4-bit code step
    before = {n: _storage_state(quant.get_submodule(n).base_layer) for n in ("0", "2")}
    x = mlp_input()["input"]
    with torch.no_grad():
        live = quant(x)
    with pytest.raises(Q.QuantizedMergeError, match=r"Refusing to merge \['tiny'\].*'(0|2)' \(bitsandbytes Linear4bit "
                       r"\(nf4, double-quantized\)\).*Keep the adapters live.*float copy"):
        da.merge_adapters(quant)
    state = da.model.adapter_state(quant)
    assert state.merged == [] and da.active_adapters(quant) == [("tiny", 1.0)]
    for n in ("0", "2"):
        _assert_same_storage(quant.get_submodule(n).base_layer, before[n])
    with torch.no_grad():
        assert torch.equal(quant(x), live)
    # a refused merge-switch goes back to the merged adapter it came from
    torch.manual_seed(7)
    da.add_adapter(quant, SMALL["hra"](target_modules=["0", "2"]), "big")
    randomise(quant, "big")
    with pytest.warns(Q.QuantizedMergeWarning):
        da.merge_adapters(quant)
    merged = {n: _storage_state(quant.get_submodule(n).base_layer) for n in ("0", "2")}
    with pytest.raises(Q.QuantizedMergeError):
        da.set_adapters(quant, "tiny")
    assert state.merged == ["big"] and da.active_adapters(quant) == [("big", 1.0)]
    for n in ("0", "2"):
        _assert_same_storage(quant.get_submodule(n).base_layer, merged[n])
    Q.set_merge_limit(quant, float("inf"))
    with pytest.warns(Q.QuantizedMergeWarning):
        da.set_adapters(quant, "tiny")
    assert state.merged == ["tiny"]
    da.unmerge_adapters(quant)
    for n in ("0", "2"):
        _assert_same_storage(quant.get_submodule(n).base_layer, before[n])


@pytest.mark.parametrize("qtype", ["nf4-dq", "int8"])
def test_delete_and_unload_while_merged_restore_the_quantized_layer(qtype):
    quant, _ = small(qtype)
    layer = quant[0]
    before = _storage_state(layer)
    for name in ("a", "b"):
        torch.manual_seed(7)
        da.add_adapter(quant, SMALL["hra"](target_modules=["0", "2"]), name)
        randomise(quant, name)
    da.set_adapters(quant, ["a", "b"])
    with pytest.warns(Q.QuantizedMergeWarning):
        da.merge_adapters(quant)
        da.delete_adapter(quant, "b")  # re-merges a alone, from the original storage
    assert set(Q.merge_report(quant)) == {"0", "2"}
    da.unload(quant)
    assert quant[0] is layer
    _assert_same_storage(layer, before)


def test_merge_after_bitsandbytes_cpu_repack_restores_that_storage():
    """In eval without autograd bitsandbytes may repack a 4-bit weight for its CPU kernel (bf16
    absmax, in place); a merge then starts from that storage and unmerging gives it back bit for bit."""
    quant, _ = small("nf4-dq", train=False)
    torch.manual_seed(7)
    da.add_adapter(quant, SMALL["hra"](target_modules=["0", "2"]), "a")
    randomise(quant, "a")
    x = mlp_input()["input"]
    with torch.no_grad():
        live = quant(x)
    before = {n: _storage_state(quant.get_submodule(n).base_layer) for n in ("0", "2")}
    with pytest.warns(Q.QuantizedMergeWarning):
        da.merge_adapters(quant)
    with torch.no_grad():
        assert rel(quant(x), live) < 0.2
    da.unmerge_adapters(quant)
    for n in ("0", "2"):
        _assert_same_storage(quant.get_submodule(n).base_layer, before[n])
    with torch.no_grad():
        assert torch.equal(quant(x), live)


# -- 5. unsupported quantized layers ----------------------------------------------------------------
class HQQLinear(nn.Module):  # looks like another library's quantized layer (detected by its package name)
    __module__ = "hqq.core.quantize"

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 64, 64
        self.register_buffer("W_q", torch.zeros(64, 32, dtype=torch.uint8))

    def forward(self, x):
        return x


def _unsupported_layers():
    fp8 = nn.Linear(64, 64)
    fp8.weight = nn.Parameter(fp8.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    fp16_int8 = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)
    not_yet = bnb.nn.Linear4bit(64, 64, quant_type="nf4")  # never moved to a device: float weight
    return {
        "float8_e4m3fn": fp8,
        "has_fp16_weights=True": fp16_int8,
        "not quantized yet": not_yet,
        "a hqq layer": HQQLinear(),
    }


@pytest.mark.parametrize("why", list(_unsupported_layers()))
def test_unsupported_quantized_layer_is_refused_naming_it(why):
    model = mlp()
    model[0] = _unsupported_layers()[why]
    kinds = [type(m) for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Q.UnsupportedQuantizedLayerError) as info:
        da.add_adapter(model, da.HRAConfig(r=2, target_modules=["0", "2"]), "a")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Module '0' is a quantized ") and why in msg
    assert type(model[0]).__name__ in msg
    assert [type(m) for m in model.modules()] == kinds and "_diffadapt" not in model.__dict__
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unsupported_quantized_layer_is_refused_at_load(tmp_path):
    model = mlp()
    da.add_adapter(model, da.HRAConfig(r=2, target_modules=["0", "2"]), "a")
    da.save_adapter(model, tmp_path / "a", "a")
    target = mlp()
    target[0] = _unsupported_layers()["float8_e4m3fn"]
    with pytest.raises(da.AdapterConfigError, match=r"Module '0' is a quantized torch.nn.modules.linear.Linear "
                       r"\(its weight is float8_e4m3fn\)") as info:
        da.load_adapter(target, tmp_path / "a", "a")
    assert "\n" not in str(info.value) and "_diffadapt" not in target.__dict__


# -- files: the same from a quantized base as from a float base -----------------------------------
@pytest.mark.parametrize("method", list(SMALL))
def test_saved_files_match_a_float_base(method, tmp_path):
    float_model = mlp()
    quant, deq = quantize(mlp(), ["0", "2"], "nf4-dq")
    saved_files_match_float(method, quant, float_model, tmp_path)
    # the quantized base's file loads into a float model; on the dequantized weights it is the same function
    da.load_adapter(float_model, tmp_path / "quant", "q")
    da.load_adapter(deq, tmp_path / "quant", "a")
    randomise_both(quant, deq, "a")
    check_forward_backward(quant.train(), deq.train(), mlp_input, lambda y: y)
