"""Shared by the quantized-base tests (bitsandbytes: test_quantized.py; torchao / optimum-quanto:
test_quantized_tensors.py): a model with some Linear layers quantized next to its float32 reference
(the same layers computing with the dequantized weights), the same adapter on both, and the
forward/backward comparison."""

from __future__ import annotations

import copy

import torch
from torch import nn

import diffadapt as da
from diffadapt import quantized as Q
from tests.test_runtime import SMALL, rel

TOL = 1e-5


def with_reference(model: nn.Module, names, quantize_layers) -> tuple[nn.Module, nn.Module]:
    """``model`` after ``quantize_layers(model, names)`` (in place), and its float32 reference: a copy
    of the float model whose layers ``names`` compute with the quantized layers' dequantized weights."""
    ref = copy.deepcopy(model)
    quantize_layers(model, names)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, Q.float_copy(model.get_submodule(name)))
    return model, ref


def randomise_both(a, b, name, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    pa, pb = da.adapter_parameters(a, name), da.adapter_parameters(b, name)
    assert list(pa) == list(pb)
    with torch.no_grad():
        for key, p in pa.items():
            assert torch.equal(p, pb[key]), key  # same init on the quantized layer and on its float reference
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale
            for t in (p, pb[key]):
                t.mul_(1 + noise) if key.endswith(("boft_s", "frod_lambda_l")) else t.add_(noise)


def add_both(quant, ref, method, name="a", scale=0.1, **kw):
    for m in (quant, ref):
        torch.manual_seed(7)
        da.add_adapter(m, SMALL[method](**kw), name)
    randomise_both(quant, ref, name, scale=scale)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


def mlp_input():
    return {"input": torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(3))}


def check_forward_backward(quant, ref, make_input, outputs):
    """Outputs, input gradients and adapter-parameter gradients equal within TOL (relative)."""
    xq, xr = make_input(), make_input()
    for x in (xq, xr):
        for t in x.values():
            if t.is_floating_point():
                t.requires_grad_(True)
    yq, yr = outputs(quant(**xq)), outputs(ref(**xr))
    assert rel(yq, yr) < TOL
    (yq.square().sum()).backward()
    (yr.square().sum()).backward()
    for k in xq:
        if xq[k].is_floating_point():
            assert rel(xq[k].grad, xr[k].grad) < TOL, k
    pq = {k: p for k, p in quant.named_parameters() if p.requires_grad}
    pr = {k: p for k, p in ref.named_parameters() if p.requires_grad}
    assert set(pq) == set(pr) and pq
    worst = max(rel(pq[k].grad, pr[k].grad) for k in pq)
    assert worst < TOL, worst
    return rel(yq, yr), worst


def saved_files_match_float(method: str, quant: nn.Module, float_model: nn.Module, tmp_path) -> None:
    """The same adapter (same seed) added to ``quant`` and to ``float_model`` and saved to
    ``tmp_path/quant`` and ``tmp_path/float``: the same keys and shapes, equal tensors, except
    FRoD's spectrum, which its init reads from the (quantized) weight: within twice the
    quantization error of the weights."""
    from safetensors.torch import load_file

    files = {}
    for tag, m in (("float", float_model), ("quant", quant)):
        torch.manual_seed(7)
        da.add_adapter(m, SMALL[method](target_modules=["0", "2"]), "a")
        files[tag] = load_file(str(da.save_adapter(m, tmp_path / tag, "a") / "adapter_model.safetensors"))
    f, q = files["float"], files["quant"]
    assert {k: v.shape for k, v in f.items()} == {k: v.shape for k, v in q.items()}
    quant_error = max(rel(Q.dequantized_weight(quant.get_submodule(n).base_layer),
                          float_model.get_submodule(n).base_layer.weight.detach()) for n in ("0", "2"))
    for k in f:
        if method == "frod" and "lambda" in k and f[k].norm() > 0:  # FRoD's init reads the weight: its spectrum moves with it
            assert rel(q[k], f[k]) < 2 * quant_error, k
        elif method != "frod" or "lambda" in k:
            assert torch.equal(q[k], f[k]), k
