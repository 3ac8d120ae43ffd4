"""Adapters on torchao and optimum-quanto weight-only quantized Linear layers (their weights are
tensor subclasses), against the same adapter on the dequantized float weight (float32): live
outputs and gradients for every method, merge (requantize in the layer's format, reported error) /
unmerge (the original quantized tensor back, bit for bit), merges refused for formats without a
requantizer, refused layer kinds, files identical to a float base's, and the pipeline loader on a
denoiser loaded through diffusers' ``TorchAoConfig`` / ``QuantoConfig``.

Formats (all run on the CPU with torch 2.13): torchao ``Int8WeightOnlyConfig`` (``Int8Tensor``,
per row), ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``
(``IntxUnpackedToInt8Tensor``, torchao's int4 weight-only format for the CPU: its ``Int4WeightOnlyConfig``
packings need CUDA / mslk or bf16 tinygemm here) and ``Float8WeightOnlyConfig`` (live only: no
requantizer); quanto ``qint8`` / ``qint4`` (frozen ``QLinear``). Each computes with its dequantized
weight on the CPU, which is where the float32 reference is exact.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

import diffadapt as da
from diffadapt import quantized as Q
from diffadapt import quantized_tensors as QT
from diffadapt.methods import METHOD_NAMES
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
from tests.test_runtime import SMALL, rel


def _present(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # its parent package (optimum) is absent
        return False


def _needs(package):
    return pytest.mark.skipif(not _present(package),
                              reason=f"{package} not installed (pip install 'diffadapt[quantized]')")


def _torchao(config):
    def run(model, names):
        import torchao.quantization as tq

        made = {"int8": lambda: tq.Int8WeightOnlyConfig(),
                "int4": lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32)),
                "float8": lambda: tq.Float8WeightOnlyConfig()}[config]()
        tq.quantize_(model, made, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
    return run


def _quanto(qtype, activations=None, frozen=True):
    def run(model, names):
        import optimum.quanto as oq

        oq.quantize(model, weights=getattr(oq, qtype), activations=activations and getattr(oq, activations),
                    include=list(names))
        if frozen:
            oq.freeze(model)
    return run


QTYPES = {
    "torchao-int8": pytest.param(_torchao("int8"), marks=_needs("torchao"), id="torchao-int8"),
    "torchao-int4": pytest.param(_torchao("int4"), marks=_needs("torchao"), id="torchao-int4"),
    "torchao-float8": pytest.param(_torchao("float8"), marks=_needs("torchao"), id="torchao-float8"),
    "quanto-qint8": pytest.param(_quanto("qint8"), marks=_needs("optimum.quanto"), id="quanto-qint8"),
    "quanto-qint4": pytest.param(_quanto("qint4"), marks=_needs("optimum.quanto"), id="quanto-qint4"),
}
REQUANTIZED = [v for k, v in QTYPES.items() if k != "torchao-float8"]
# relative weight error of one requantization (measured on the 64x64 / 32x64 layers: int8 ~4e-3, int4 ~7e-2)
REQUANT_ERROR = {"int8": 0.01, "int4": 0.15}


def small(quantize_layers, train=True):
    quant, ref = with_reference(mlp(), ["0", "2"], quantize_layers)
    return quant.train(train), ref.train(train)


def _bits(layer):
    return {k: v.clone() for k, v in QT.inner_tensors(layer.weight).items()}


def _assert_same_bits(layer, before):
    now = _bits(layer)
    assert set(now) == set(before)
    for k in before:
        assert now[k].dtype == before[k].dtype and torch.equal(now[k], before[k]), k


# -- live adapters --------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize_layers", QTYPES.values())
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_live_adapter_equals_float_reference(method, quantize_layers):
    quant, ref = small(quantize_layers)
    assert {Q.kind(quant[i]) for i in (0, 2)} in ({Q.TORCHAO}, {Q.QUANTO}) and Q.kind(ref[0]) == ""
    add_both(quant, ref, method, target_modules=["0", "2"])
    assert all(h.quantized for _, h in da.model.hosts(quant))
    check_forward_backward(quant, ref, mlp_input, lambda y: y)
    with torch.no_grad():  # eval, no autograd: the same
        x = mlp_input()["input"]
        assert rel(quant.eval()(x), ref.eval()(x)) < TOL


@pytest.mark.parametrize("quantize_layers", [QTYPES["torchao-int4"], QTYPES["quanto-qint4"]])
def test_no_dequantization_per_step(quantize_layers, monkeypatch):
    """FRoD dequantizes once to build its bases; the live forward never does (the layer runs as a module)."""
    quant, ref = small(quantize_layers)
    add_both(quant, ref, "frod", target_modules=["0", "2"])
    calls = []
    real = QT.dequantize
    monkeypatch.setattr(QT, "dequantize", lambda w: calls.append(1) or real(w))
    x = mlp_input()["input"]
    quant(x).sum().backward()
    with torch.no_grad():
        quant.eval()(x)
    assert calls == []


# -- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize_layers", REQUANTIZED)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merge_requantizes_reports_and_unmerge_restores_bits(method, quantize_layers, request):
    quant, ref = small(quantize_layers)
    add_both(quant, ref, method, target_modules=["0", "2"])
    Q.set_merge_limit(quant, math.inf)  # measured here: the requantization error, whatever its ratio
    layers = {n: quant.get_submodule(n).base_layer for n in ("0", "2")}
    tensors = {n: layer.weight for n, layer in layers.items()}
    before = {n: _bits(layer) for n, layer in layers.items()}
    x = mlp_input()["input"]
    with torch.no_grad():
        live = quant(x)
    exact = {n: ref.get_submodule(n).effective_weight().detach() for n in ("0", "2")}  # float32 W_eff
    with pytest.warns(Q.QuantizedMergeWarning, match=r"Merging requantized '(0|2)' \((torchao|optimum-quanto) "):
        da.merge_adapters(quant)
    report = Q.merge_report(quant)
    assert set(report) == {"0", "2"}
    bound = REQUANT_ERROR["int4" if "int4" in request.node.callspec.id else "int8"]
    for n, layer in layers.items():
        assert type(layer.weight) is type(tensors[n])  # requantized in the same format
        merged_w = Q.dequantized_weight(layer).float()
        err = rel(merged_w, exact[n])
        assert abs(report[n].relative_error - err) < 1e-4 * err + 1e-7 and 0 < err < bound, (err, report[n])
        with torch.no_grad():  # what runs is the requantized weight exactly
            z = torch.randn(3, 64)
            assert rel(quant.get_submodule(n)(z), nn.functional.linear(z, merged_w, layer.bias)) < TOL
    da.unmerge_adapters(quant)
    assert Q.merge_report(quant) == {}
    for n, layer in layers.items():
        assert type(layer.weight) is type(tensors[n])
        _assert_same_bits(layer, before[n])
    with torch.no_grad():
        assert torch.equal(quant(x), live)


@pytest.mark.parametrize("quantize_layers", [QTYPES["torchao-int8"], QTYPES["quanto-qint4"]])
def test_merge_that_rounding_would_erase_is_refused(quantize_layers):
    quant, _ = small(quantize_layers)
    torch.manual_seed(7)
    da.add_adapter(quant, SMALL["fourierft"](target_modules=["0", "2"]), "tiny")
    with torch.no_grad():
        for p in da.adapter_parameters(quant, "tiny").values():
            p.fill_(1e-7)  # far below a code step
    before = {n: _bits(quant.get_submodule(n).base_layer) for n in ("0", "2")}
    with pytest.raises(Q.QuantizedMergeError, match=r"Refusing to merge \['tiny'\].*Keep the adapters live"):
        da.merge_adapters(quant)
    assert da.model.adapter_state(quant).merged == []
    for n in ("0", "2"):
        _assert_same_bits(quant.get_submodule(n).base_layer, before[n])


@_needs("torchao")
def test_merge_into_a_format_without_requantizer_is_refused():
    """torchao float8 weights run live, but diffadapt has no requantizer for them: merging is refused
    before anything changes, also with the limit lifted, naming the layer and what to do."""
    quant, ref = small(_torchao("float8"))
    add_both(quant, ref, "hra", target_modules=["0", "2"])
    layer = quant[0].base_layer
    weight, before = layer.weight, _bits(layer)
    x = mlp_input()["input"]
    with torch.no_grad():
        live = quant(x)
    Q.set_merge_limit(quant, math.inf)
    with pytest.raises(Q.QuantizedMergeError, match=r"Refusing to merge \['a'\] into quantized layers: '(0|2)' \(torchao "
                       r"Float8Tensor \(float8_e4m3fn weight-only.*cannot be requantized.*Keep the adapters live.*float copy"):
        da.merge_adapters(quant)
    assert da.model.adapter_state(quant).merged == [] and type(layer.weight) is type(weight)
    _assert_same_bits(layer, before)
    with torch.no_grad():
        assert torch.equal(quant(x), live)
    line = Q.merge_or_keep_live(quant)
    assert line.startswith("merge refused, adapters kept live") and "cannot be requantized" in line


def _refused():
    cases = {}
    if _present("optimum.quanto"):
        cases["not frozen"] = pytest.param(_quanto("qint8", frozen=False), "not frozen", id="quanto-not-frozen")
        cases["activations"] = pytest.param(_quanto("qint8", "qint8"), r"activations are quantized too \(qint8\)",
                                            id="quanto-activations")
    if _present("torchao"):
        def dynamic(model, names):
            import torchao.quantization as tq

            tq.quantize_(model, tq.Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in names)
        cases["dynamic"] = pytest.param(dynamic, "Int8Tensor weight quantizes activations too", id="torchao-dynamic")
    return list(cases.values()) or [pytest.param(None, "", marks=pytest.mark.skip("neither torchao nor quanto"))]


@pytest.mark.parametrize(("quantize_layers", "why"), _refused())
def test_unsupported_kinds_are_refused_naming_the_layer(quantize_layers, why):
    model = mlp()
    quantize_layers(model, ["0"])
    with pytest.raises(Q.UnsupportedQuantizedLayerError, match=rf"^Module '0' is a quantized .*{why}") as info:
        da.add_adapter(model, da.HRAConfig(r=2, target_modules=["0", "2"]), "a")
    assert "\n" not in str(info.value) and "_diffadapt" not in model.__dict__


# -- files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize_layers", [QTYPES["torchao-int8"], QTYPES["quanto-qint4"]])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_saved_files_match_a_float_base_and_load_both_ways(method, quantize_layers, tmp_path):
    float_model = mlp()
    quant, deq = with_reference(mlp(), ["0", "2"], quantize_layers)
    saved_files_match_float(method, quant, float_model, tmp_path)
    # quantized -> float: the file loads on the dequantized float model, the same function
    da.load_adapter(deq, tmp_path / "quant", "a")
    randomise_both(quant, deq, "a")
    check_forward_backward(quant, deq, mlp_input, lambda y: y)
    # float -> quantized: the float model's trained adapter, saved and loaded back on the quantized base
    da.save_adapter(deq, tmp_path / "back", "a")
    da.load_adapter(quant, tmp_path / "back", "b")
    da.set_adapters(quant, "b")
    x = mlp_input()["input"]
    with torch.no_grad():
        assert rel(quant(x), deq(x)) < TOL


# -- pipelines ------------------------------------------------------------------------------------
def _diffusers_config(which):
    from diffusers import QuantoConfig, TorchAoConfig

    if which == "torchao":
        import torchao.quantization as tq

        return TorchAoConfig(tq.Int8WeightOnlyConfig())
    return QuantoConfig(weights_dtype="int4")


@pytest.mark.parametrize("which", [pytest.param("torchao", marks=_needs("torchao")),
                                   pytest.param("quanto", marks=_needs("optimum.quanto"))])
def test_pipeline_loader_on_a_denoiser_loaded_quantized_switches_live(which, tmp_path):
    """diffusers loads the tiny SD UNet quantized on the CPU (``from_pretrained(...,
    quantization_config=TorchAoConfig / QuantoConfig)``); ``da.load_adapter(pipe, ...)`` loads two
    adapters into it and switches them live; each gives the images of the same adapter on the
    float pipeline whose UNet holds the dequantized weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tests import tiny_models as tm
    from tests import tiny_pipelines as tp

    tp.BUILDERS["sd"](0).save_pretrained(tmp_path / "sd", safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet", torch_dtype=torch.float32,
                                                quantization_config=_diffusers_config(which))
    quant = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", unet=unet)
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    layers = [n for n, m in quant.unet.named_modules() if Q.is_quantized(m)]
    assert len(layers) == 50 and {Q.kind(quant.unet.get_submodule(n)) for n in layers} == {which}
    for name in layers:
        parent, _, child = name.rpartition(".")
        setattr(ref.unet.get_submodule(parent), child, Q.float_copy(quant.unet.get_submodule(name)))
    files = []
    for seed, name in enumerate("ab"):  # adapters trained elsewhere (a float copy), saved as files
        torch.manual_seed(7)
        da.add_adapter(ref.unet, da.OFTConfig(oft_block_size=8) if name == "a" else da.HRAConfig(r=2), name)
        tm.randomise(ref.unet, name, seed, scale=0.1)
        files.append(da.save_adapter(ref, tmp_path / name, name))
        da.delete_adapter(ref.unet, name)
    for p in (quant, ref):
        p.set_progress_bar_config(disable=True)
        for name, f in zip("ab", files):
            da.load_adapter(p, f, name)

    def images(p):
        out = p("a prompt", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
        return torch.from_numpy(out.images)

    seen = {}
    for name in ("a", "b", "a"):
        for p in (quant, ref):
            da.set_adapters(p, name)
        q, r = images(quant), images(ref)
        assert rel(q, r) < 1e-4, (name, rel(q, r))
        if name in seen:
            assert torch.equal(q, seen[name])  # switching back is exact
        seen[name] = q
    assert rel(seen["a"], seen["b"]) > 1e-2  # two different adapters: the tolerance tells them apart
