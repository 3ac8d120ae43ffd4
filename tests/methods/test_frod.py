"""FRoD vs PEFT (outputs, V, S pattern, init, dropout), gradients, strength, grouping, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import FrodConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.pytorch_utils import Conv1D

from diffadapt.formats import peft as peft_format
from diffadapt.formats.peft import frod as peft_frod
from diffadapt.methods import AdapterConfigError, LayerSpec, get_method
from diffadapt.methods import _frod_basis
from diffadapt.methods import frod as frod_module
from diffadapt.methods.frod import FRoD, FRoDConfig, peft_category, sparse_nnz, uses_weight_path
from tests import contract

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's fan_in_fan_out / sparse notices


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


class Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


class Adapted(nn.Module):
    """One module with our adapter, run through tests.contract (stands in for the runtime)."""

    def __init__(self, base, params, buffers, cfg):
        super().__init__()
        self.base, self.cfg, self.buffers = base, cfg, buffers
        self.names = list(params)
        for k, v in params.items():
            self.register_parameter(k, v if isinstance(v, nn.Parameter) else nn.Parameter(v))
        self.strength = 1.0

    @property
    def params(self):
        return {k: getattr(self, k) for k in self.names}

    def forward(self, x):
        return contract.forward(FRoD, self.cfg, self.base, self.params, self.buffers, x, self.strength, self.training)


def assert_joint_basis(V, mats, alpha=1e-3):
    """V solves FRoD's joint decomposition of ``mats`` (float64 reference): with A = [W_1; ..] = QR,
    E = R^{-T} V is orthogonal and diagonalises T = mean_i (Q_i^T Q_i + alpha I)^{-1} in ascending
    order (the invariant statement: eigenvectors of (near-)equal eigenvalues are not unique)."""
    A, V = torch.cat(mats).double(), V.double()
    if A.shape[0] < A.shape[1]:  # full SVD branch: V orthogonal, right singular vectors
        E, M = V, A.T @ A
        lam = torch.linalg.svdvals(A).square()
        lam = torch.cat([lam, lam.new_zeros(A.shape[1] - lam.numel())])
    else:
        Q, R = torch.linalg.qr(A)
        o, i = mats[0].shape
        M = sum(torch.linalg.inv(q.T @ q + alpha * torch.eye(i, dtype=A.dtype)) for q in Q.split(o)) / len(mats)
        E, lam = torch.linalg.solve(R.T, V), torch.linalg.eigvalsh(M)
    torch.testing.assert_close(E.T @ E, torch.eye(E.shape[1], dtype=A.dtype), rtol=0, atol=1e-5)
    torch.testing.assert_close(E.T @ M @ E, torch.diag(lam), rtol=0, atol=1e-5 * lam.abs().max().item())


def peft_model(model, targets, **kw):
    cfg = FrodConfig(target_modules=targets, progressbar=False, **kw)
    return get_peft_model(copy.deepcopy(model), cfg)


def randomize_peft(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "frod_lambda_l" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))
            elif "frod_lambda_s_values" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def ours_like_peft(model, pm, names, cfg):
    """Our adapter on a copy of ``model``: shared from our own init (asserted equal to PEFT's saved
    V / pattern), parameters copied from PEFT's state dict through ``peft_format.keys("frod")``."""
    mods = dict(model.named_modules())
    specs = [contract.layer_spec(n, mods[n]) for n in names]
    weights = [contract.weight_2d(mods[n]).detach() for n in names]
    shared = FRoD.init_shared(cfg, specs, weights)
    sd = get_peft_model_state_dict(pm)
    ours = copy.deepcopy(model)
    for name, spec, w, sh in zip(names, specs, weights, shared):
        cat = peft_category(name)
        assert torch.equal(sh["V"], sd[f"base_model.frod_V.{cat}"]), name
        assert torch.equal(sh["indices"], sd[f"base_model.frod_s_indices.{cat}"]), name
        assert sd[f"base_model.frod_s_size.{cat}"].tolist() == [spec.fan_in] * 2
        params, buffers = FRoD.init_layer(cfg, spec, w, sh)
        for ours_key, suffix in peft_format.keys("frod").items():
            params[ours_key] = sd[f"base_model.model.{name}.{suffix}"].clone()
        parent, _, child = name.rpartition(".")
        module = ours.get_submodule(parent) if parent else ours
        setattr(module, child, Adapted(mods[name], params, buffers, cfg))
    return ours, shared


# ---------------------------------------------------------------- vs PEFT, one layer
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("tokens", [6, 64])  # 6: basis path; 64: dW path
def test_layer_vs_peft(kind, tokens):
    torch.manual_seed(0)
    base = nn.Linear(24, 20) if kind == "linear" else Conv1D(20, 24)
    d_in, d_out = 24, 20
    pm = peft_model(Wrap(base), ["lin"], fan_in_fan_out=kind == "conv1d")
    randomize_peft(pm)
    cfg = FRoDConfig(projection_mode="peft", fan_in_fan_out=kind == "conv1d")
    ours, _ = ours_like_peft(Wrap(base), pm, ["lin"], cfg)
    assert uses_weight_path(tokens, d_out, d_in) == (tokens == 64)
    x = torch.randn(2, tokens // 2, d_in)
    with torch.no_grad():
        y_peft, y, y_base = pm(x), ours(x), base(x)
        lin = ours.lin
        y_merged = contract.merged_forward(FRoD, cfg, base, lin.params, lin.buffers, x)
    assert rel_err(y_peft, y_base) > 0.05  # the adapter is far from the identity
    assert rel_err(y, y_peft) < 1e-5
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-6)


def test_init_weights_false_and_dropout_match_peft():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    cfg = FRoDConfig(init_weights=False, frod_dropout=0.3, projection_mode="peft")
    torch.manual_seed(5)
    pm = peft_model(Wrap(base), ["lin"], init_weights=False, frod_dropout=0.3)
    torch.manual_seed(5)
    _, params, buffers = contract.init(FRoD, cfg, base, name="lin")
    layer = pm.base_model.model.lin
    assert torch.equal(params["frod_lambda_l"].data, layer.frod_lambda_l["default"].data)
    assert torch.equal(params["frod_lambda_s_values"].data, layer.frod_lambda_s_values["default"].data)
    assert not torch.equal(params["frod_lambda_l"].data, buffers["lambda0"])
    x = torch.randn(3, 5, 16)
    pm.train()
    torch.manual_seed(9)
    y_peft = pm(x)
    torch.manual_seed(9)
    y = contract.forward(FRoD, cfg, base, params, buffers, x, training=True)
    torch.manual_seed(10)
    y_other_mask = contract.forward(FRoD, cfg, base, params, buffers, x, training=True)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    assert rel_err(y_other_mask, y) > 1e-3  # dropout really acts
    y_eval = contract.forward(FRoD, cfg, base, params, buffers, x, training=False)
    assert torch.equal(y_eval, contract.forward(FRoD, cfg, base, params, buffers, x, training=False))


# ---------------------------------------------------------------- vs PEFT, CLIP text encoder
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    model = CLIPTextModel(cfg).eval()
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in CLIP_TARGETS]
    return model, names


def test_clip_text_model_vs_peft(clip):
    model, names = clip
    pm = peft_model(model, CLIP_TARGETS).eval()
    randomize_peft(pm, seed=3)
    ours, shared = ours_like_peft(model, pm, names, FRoDConfig(projection_mode="peft"))
    ours.eval()
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad():
        y_peft = pm(input_ids=ids).last_hidden_state
        y = ours(input_ids=ids).last_hidden_state
        y_base = model(input_ids=ids).last_hidden_state
    assert rel_err(y_peft, y_base) > 0.05
    assert rel_err(y, y_peft) < 1e-5
    # one dict, one V, one pattern per group; the 6 roles x 2 blocks give 6 groups
    by_role = {}
    for n, sh in zip(names, shared):
        by_role.setdefault(n.split(".", 3)[-1], []).append(sh)
    assert len(by_role) == 6 and all(a is b for a, b in by_role.values())
    assert len({id(sh["V"]) for sh in shared}) == 6


def test_clip_fast_mode_same_pattern_exact_init(clip):
    """float64 ("fast") bases: same S pattern as PEFT; a different but valid V (PEFT's float32 V is
    a rounding-dependent choice), and U diag(Lambda0) V^T = W; init = base model exactly."""
    model, names = clip
    pm = peft_model(model, CLIP_TARGETS)
    sd = get_peft_model_state_dict(pm)
    mods = dict(model.named_modules())
    specs = [contract.layer_spec(n, mods[n]) for n in names]
    weights = [contract.weight_2d(mods[n]).detach() for n in names]
    cfg = FRoDConfig()
    shared = FRoD.init_shared(cfg, specs, weights)
    for n, spec, w, sh in zip(names, specs, weights, shared):
        cat = peft_category(n)
        assert torch.equal(sh["indices"], sd[f"base_model.frod_s_indices.{cat}"])
        assert_joint_basis(sh["V"], [weights[j] for j, m in enumerate(names) if peft_category(m) == cat])
        params, buffers = FRoD.init_layer(cfg, spec, w, sh)
        rec = buffers["U"].double() @ torch.diag(buffers["lambda0"].double()) @ sh["V"].double().T
        assert rel_err(rec, w.double()) < 1e-6
        x = torch.randn(4, spec.in_features)
        y = contract.forward(FRoD, cfg, mods[n], params, buffers, x)
        assert torch.equal(y, torch.nn.functional.linear(x, w) + mods[n].bias)


# ---------------------------------------------------------------- grouping beyond PEFT
class Tree(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        for name, (o, i) in spec.items():
            parent = self
            *path, leaf = name.split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            parent.add_module(leaf, nn.Linear(i, o))


@pytest.mark.parametrize("n, d_out, d_in", [(1, 9, 6), (3, 4, 6), (2, 2, 7), (1, 3, 8)])
def test_batched_joint_basis_float64(n, d_out, d_in):
    """The batched decomposition of two groups at once (the tall branch's T = L^T X L, the wide one's
    complete QR + eigh of R R^T) solves each group's joint decomposition (float64 reference)."""
    torch.manual_seed(0)
    w = torch.randn(2, n, d_out, d_in, dtype=torch.float64)
    V, ok = _frod_basis._basis_batched(w, 1e-3)
    assert V.shape == (2, d_in, d_in) and ok.tolist() == [True, True]
    for g in range(2):
        assert_joint_basis(V[g], list(w[g]))


def test_unet_and_dit_grouping():
    """SD-UNet-like widths (PEFT concatenates 8- and 16-wide weights of one category and crashes)
    and a DiT with double and single blocks (PEFT merges both into category 'attn_to_q')."""
    torch.manual_seed(0)
    spec = {}
    for b, width in enumerate([8, 16]):
        for a in range(2):
            spec[f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.to_q"] = (width, width)
    spec["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] = (16, 16)
    spec["mid_block.proj_down"] = (4, 12)  # N d_out < d_in: the SVD branch
    for b in range(3):
        spec[f"transformer_blocks.{b}.attn.to_q"] = (12, 12)
        spec[f"single_transformer_blocks.{b}.attn.to_q"] = (12, 12)
    model = Tree(spec)
    names = list(spec)
    mods = dict(model.named_modules())
    specs = [contract.layer_spec(n, mods[n]) for n in names]
    weights = [contract.weight_2d(mods[n]).detach() for n in names]
    shared = FRoD.init_shared(FRoDConfig(), specs, weights)
    keys = [FRoD.group_key(s) for s in specs]
    assert keys[0] == "down_blocks.attentions.transformer_blocks.attn1.to_q@8x8"
    assert len(set(keys)) == 6
    for k in set(keys):
        members = [j for j, kj in enumerate(keys) if kj == k]
        assert all(shared[j] is shared[members[0]] for j in members)
        assert_joint_basis(shared[members[0]]["V"], [weights[j] for j in members])
        assert shared[members[0]]["indices"].shape == (2, sparse_nnz(specs[members[0]].fan_in, 0.01))
    assert peft_category(names[-1]) == peft_category(names[-2]) == "attn_to_q"
    assert shared[-1] is not shared[-2]
    for n, spec_, w, sh in zip(names, specs, weights, shared):  # every group adapts its layers
        params, buffers = FRoD.init_layer(FRoDConfig(), spec_, w, sh)
        params["frod_lambda_l"] = params["frod_lambda_l"] * 1.1
        x = torch.randn(3, spec_.in_features)
        y0 = torch.nn.functional.linear(x, w) + mods[n].bias
        y = contract.forward(FRoD, FRoDConfig(), mods[n], params, buffers, x)
        assert rel_err(y - y0, 0.1 * torch.nn.functional.linear(x, w)) < 1e-5  # dW = 0.1 W


def test_group_order_follows_peft_categories():
    """Generator draws go in PEFT's sorted-category order ('attn_z_proj' < 'mlp_a_proj'), not in
    the order of our group keys ('dec.layers.mlp...' < 'enc.layers.attn...')."""
    torch.manual_seed(0)
    roles = [("enc", "attn.z_proj"), ("dec", "mlp.a_proj")]
    spec = {f"{p}.layers.{b}.{leaf}": (6, 6) for p, leaf in roles for b in range(2)}
    model = Tree(spec)
    pm = peft_model(model, ["z_proj", "a_proj"])
    randomize_peft(pm)
    ours, _ = ours_like_peft(model, pm, list(spec), FRoDConfig(projection_mode="peft"))  # asserts V, pattern
    x = torch.randn(3, 6)
    for name in spec:
        with torch.no_grad():
            y, y_peft = ours.get_submodule(name)(x), pm.base_model.model.get_submodule(name)(x)
        assert rel_err(y, y_peft) < 1e-5


def test_shared_from_saved_and_zero_layer():
    torch.manual_seed(0)
    cfg = FRoDConfig()
    names = ["blocks.0.proj", "blocks.1.proj"]
    specs = [LayerSpec(n, "linear", 10, 6) for n in names]
    weights = [torch.randn(10, 6), torch.zeros(10, 6)]  # a zero-initialised layer (adaLN-zero)
    shared = FRoD.init_shared(cfg, specs, weights)
    V, idx = shared[0]["V"].clone(), shared[0]["indices"].clone()
    saved = {"proj": {"V": V, "indices": idx, "size": torch.tensor([6, 6])}}  # PEFT's frod_s_size is ignored
    loaded = peft_frod.shared_from_projections(cfg, specs, weights, saved, keys=[peft_category(n) for n in names])
    assert loaded[0] is loaded[1] and torch.equal(loaded[0]["V"], shared[0]["V"])
    for spec, w, sh in zip(specs, weights, loaded):
        params, buffers = FRoD.init_layer(cfg, spec, w, sh)
        assert torch.isfinite(buffers["U"]).all()
        x = torch.randn(2, 6)
        assert torch.equal(FRoD.delta_output(x, FRoD.prepare(cfg, params, buffers, 1.0)), torch.zeros(2, 10))
    own = peft_frod.shared_from_projections(cfg, specs, weights, {FRoD.group_key(specs[0]): saved["proj"]})
    assert own[0] is own[1]


# ---------------------------------------------------------------- identity, strength, gradients
def make(seed=0, d_out=20, d_in=24, dtype=torch.float32, init_weights=True):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    cfg = FRoDConfig(init_weights=init_weights)
    spec, params, buffers = contract.init(FRoD, cfg, base)
    return cfg, base, params, buffers


@pytest.mark.parametrize("tokens", [6, 64])
def test_identity_and_strength(tokens):
    cfg, base, params, buffers = make(init_weights=False)
    x = torch.randn(tokens, 24)
    y_base = torch.nn.functional.linear(x, base.weight) + base.bias
    with torch.no_grad():
        y0 = contract.forward(FRoD, cfg, base, params, buffers, x, strength=0.0)
        y0t = contract.forward(FRoD, cfg, base, params, buffers, x, strength=torch.tensor(0.0))
        y1 = contract.forward(FRoD, cfg, base, params, buffers, x, strength=1.0)
        y1t = contract.forward(FRoD, cfg, base, params, buffers, x, strength=torch.tensor(1.0))
        yd = contract.forward(FRoD, cfg, base, params, buffers, x)
        yh = contract.forward(FRoD, cfg, base, params, buffers, x, strength=0.5)
        m0 = contract.merged_forward(FRoD, cfg, base, params, buffers, x, strength=0.0)
    assert torch.equal(y0, y_base) and torch.equal(y0t, y_base) and torch.equal(m0, base(x))
    assert torch.equal(y1, yd) and torch.equal(y1t, yd)
    assert rel_err(yd, y_base) > 0.05
    torch.testing.assert_close(yh, (y_base + yd) / 2, rtol=1e-5, atol=1e-6)  # W + a dW is linear in a
    _, base2, params2, buffers2 = make(init_weights=True)
    y_init = contract.forward(FRoD, cfg, base2, params2, buffers2, x)
    assert torch.equal(y_init, torch.nn.functional.linear(x, base2.weight) + base2.bias)
    assert torch.equal(contract.merged_forward(FRoD, cfg, base2, params2, buffers2, x), base2(x))


def test_init_exact_where_peft_rounds():
    """320x320: our init is the base layer exactly; PEFT's replacement U Lambda V^T is not."""
    torch.manual_seed(0)
    base = nn.Linear(320, 320)
    x = torch.randn(16, 320)
    pm = peft_model(Wrap(base), ["lin"])
    cfg, (_, params, buffers) = FRoDConfig(), contract.init(FRoD, FRoDConfig(), base, name="lin")
    with torch.no_grad():
        y_peft, y = pm(x), contract.forward(FRoD, cfg, base, params, buffers, x)
    assert torch.equal(y, torch.nn.functional.linear(x, base.weight) + base.bias)
    assert 0 < rel_err(y_peft, y) < 1e-5


@pytest.mark.parametrize("tokens", [2, 12])  # both forward paths (basis below T = d_out = 6, dW from there)
def test_gradcheck(tokens):
    cfg, base, params, buffers = make(seed=1, d_out=6, d_in=5, dtype=torch.float64, init_weights=False)
    assert buffers["indices"].shape[1] == 1
    cfg = FRoDConfig(sparse_rate=0.3)
    _, params, buffers = contract.init(FRoD, cfg, base)
    assert buffers["indices"].shape[1] == 7
    lam = (params["frod_lambda_l"].detach() + 0.1 * torch.randn(5, dtype=torch.float64)).requires_grad_()
    vals = torch.randn(7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(tokens, 5, dtype=torch.float64, requires_grad=True)
    W = base.weight.detach()

    def run(lam, vals, x, a):
        prep = FRoD.prepare(cfg, {"frod_lambda_l": lam, "frod_lambda_s_values": vals}, buffers, a)
        return FRoD.delta_output(x, prep), FRoD.apply_to_weight(W, prep)

    assert torch.autograd.gradcheck(lambda l, v, x: run(l, v, x, 0.7), (lam, vals, x))
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: run(lam.detach(), vals.detach(), x.detach(), a), (a,))
    d, w = run(lam, vals, x, 1.0)
    torch.testing.assert_close(d, x @ (w - W).T)


def test_compile_fullgraph():
    cfg, base, params, buffers = make(init_weights=False)
    layer = Adapted(base, params, buffers, cfg).eval()

    def both(x_small, x_large, a):
        layer.strength = a
        return layer(x_small), layer(x_large)

    xs, xl = torch.randn(1, 6, 24), torch.randn(4, 16, 24)
    compiled = torch.compile(both, fullgraph=True)
    a = torch.tensor(0.8)
    with torch.no_grad():
        got, want = compiled(xs, xl, a), both(xs, xl, a)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- small pieces and config
def test_categories_pattern_and_config_roundtrip():
    assert peft_category("encoder.layers.0.self_attn.q_proj") == "self_attn_q_proj"
    assert peft_category("encoder.layer.0.attention.output.dense") == "attention_output"
    assert peft_category("encoder.layer.0.output.dense") == "output_dense"
    assert peft_category("h.3.c_attn") == "c_attn" and peft_category("lin") == "lin"
    assert [sparse_nnz(d, r) for d, r in [(320, 0.01), (4, 0.01), (4, 0.0), (1, 0.5), (3, 1.0)]] == [1024, 1, 0, 0, 6]
    cfg, base, params, buffers = make()
    r, c = buffers["indices"]
    assert (r != c).all() and len(set(zip(r.tolist(), c.tolist()))) == r.numel() == int(24 * 24 * 0.01)
    assert get_method("frod") is FRoD
    ours = FRoDConfig(target_modules=["to_q"], sparse_rate=0.02, projection_prng_key=3)
    peft_cfg = FrodConfig(**peft_format.to_peft_dict(ours))
    assert peft_cfg.sparse_rate == 0.02 and peft_cfg.projection_prng_key == 3
    back = peft_format.from_peft_dict("frod", {**peft_cfg.to_dict(), "runtime_offload_base_weight": True})
    assert back.sparse_rate == 0.02 and back.projection_mode == "peft" and not back.runtime_offload_base_weight
    assert back.target_modules == ["to_q"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparse_rate": 1.5}, "sparse_rate=1.5 must be in"),
        ({"regularization_alpha": -1.0}, "regularization_alpha=-1.0"),
        ({"projection_prng_key": 1.5}, "projection_prng_key=1.5 must be an int seed"),
        ({"frod_dropout": 1.0}, "frod_dropout=1.0 must be in"),
        ({"save_projection": "yes"}, "save_projection='yes' must be True or False"),
        ({"runtime_offload_base_weight": True}, "runtime_offload_base_weight=True is not supported"),
        ({"projection_mode": "gpu"}, "projection_mode='gpu'"),
        ({"overrides": {"to_q": {"sparse_rate": 0.1}}}, r"override 'to_q' sets \['sparse_rate'\]"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(AdapterConfigError, match=match):
        FRoDConfig(**kwargs)


def test_layer_and_io_errors():
    cfg = FRoDConfig()
    conv = LayerSpec("down_blocks.0.attentions.0.proj_in", "conv2d", 8, 8, (1, 1))
    with pytest.raises(AdapterConfigError, match=r"cannot adapt 'down_blocks.0.attentions.0.proj_in' \[conv2d"):
        cfg.check_layer(conv)
    with pytest.raises(AdapterConfigError, match="proj_in"):
        FRoD.init_shared(cfg, [conv], [torch.randn(8, 8)])
    for bad in (FRoDConfig(overrides={"to_q": {"frod_dropout": 0.1}}), FRoDConfig(exclude_modules=["to_k"])):
        with pytest.raises(AdapterConfigError, match="PEFT's FrodConfig has no per-layer settings"):
            peft_format.to_peft_dict(bad)
    with pytest.raises(AdapterConfigError, match=r"fields diffadapt does not know: \['r'\]"):
        peft_format.from_peft_dict("frod", {"r": 8, "peft_type": "FROD"})
    spec = LayerSpec("blocks.0.proj", "linear", 10, 6)
    w = torch.randn(10, 6)
    with pytest.raises(AdapterConfigError, match=r"no saved projection 'proj' for 'blocks.0.proj'"):
        peft_frod.shared_from_projections(cfg, [spec], [w], {"other": {}}, keys=["proj"])
    bad = {"proj": {"V": torch.eye(5), "indices": torch.zeros(2, 1, dtype=torch.long)}}
    with pytest.raises(AdapterConfigError, match=r"V \(5, 5\).*does not fit 'blocks.0.proj'.*expected V \(6, 6\)"):
        peft_frod.shared_from_projections(cfg, [spec], [w], bad, keys=["proj"])
    bad = {"proj": {"V": torch.eye(6), "indices": torch.tensor([[0], [6]])}}
    with pytest.raises(AdapterConfigError, match="indices"):
        peft_frod.shared_from_projections(cfg, [spec], [w], bad, keys=["proj"])
    # a layer whose slice of the stacked QR is exactly zero: Q_2^T Q_2 + 0 I is singular
    specs = [LayerSpec(f"blocks.{b}.proj", "linear", 4, 3) for b in range(2)]
    weights = [torch.randn(4, 3), torch.zeros(4, 3)]
    for mode in ("fast", "peft"):
        match = r"joint basis of 'blocks.0.proj' \[linear, weight 4x3\], 'blocks.1.proj'.*regularization_alpha=0"
        with pytest.raises(AdapterConfigError, match=match):
            FRoD.init_shared(FRoDConfig(regularization_alpha=0.0, projection_mode=mode), specs, weights)


def _random_prep(d_out: int, d_in: int, sparse_rate: float, strength: float, seed: int = 0):
    """One float64 layer's prepared FRoD factors with a random spectrum (``init_weights=False``), its
    parameters and the layer: the setup of the math tests below."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out).double()
    cfg = FRoDConfig(sparse_rate=sparse_rate, init_weights=False, progressbar=False)
    _, params, buffers = contract.init(FRoD, cfg, layer)
    return FRoD.prepare(cfg, params, buffers, strength), params, layer


def test_basis_path_core_product_matches_autograd_float64():
    """Few tokens: (x V) (U M)^T with U M rebuilt in backward, against plain autograd through the
    dense core M = diag(lam) + S (repeated cells add)."""
    prep, params, layer = _random_prep(20, 12, 0.1, 0.8)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)  # 3 tokens < d_out: basis path
    got = FRoD.delta_output(x, prep)
    core = torch.diag(prep.lam).index_put((prep.rows, prep.cols), prep.vals, accumulate=True)
    want = torch.nn.functional.linear(torch.nn.functional.linear(x @ prep.V, core), prep.U)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    leaves = [x, *params.values()]
    a = torch.autograd.grad(got, leaves, g, retain_graph=True)
    b = torch.autograd.grad(want, leaves, g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 12), (8, 30)])  # d_out > d_in and d_out < d_in
def test_weight_path_and_its_adjoint_match_the_dense_core_float64(shape):
    """Many tokens: dW = (U M) V^T built from rows of U^T, and the adjoint read at the diagonal and
    the S cells, against autograd through the dense U M V^T -- with a repeated cell (they add)."""
    d_out, d_in = shape
    prep, params, layer = _random_prep(d_out, d_in, 0.1, 0.8)
    rows, cols = prep.rows.clone(), prep.cols.clone()
    rows[1], cols[1] = rows[0], cols[0]  # a repeated cell
    lam = prep.lam.detach().clone().requires_grad_(True)
    vals = prep.vals.detach().clone().requires_grad_(True)
    prep = prep._replace(lam=lam, vals=vals, rows=rows, cols=cols)
    core = torch.diag(lam).index_put((rows, cols), vals, accumulate=True)
    want = prep.U @ core @ prep.V.mT
    got = FRoD.delta_weight(prep, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 1e-2  # far from zero: the comparison can fail
    g = torch.randn_like(want)
    glam, gvals = FRoD.delta_weight_backward(prep, g)
    want_lam, want_vals = torch.autograd.grad(want, [lam, vals], g)
    torch.testing.assert_close(glam, want_lam, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gvals, want_vals, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- files PEFT reproduces (issue 13, 2-4)
FILE_MODELS = {  # PEFT categories differ from diffadapt's role+shape groups in both
    "unet": (lambda: __import__("tests.tiny_models", fromlist=["x"]).tiny_unet(widths=(32, 32)),
             ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]),
    "flux": (lambda: __import__("tests.tiny_models", fromlist=["x"]).tiny_flux(),
             ["to_q", "to_k", "to_v", "add_q_proj", "proj_mlp"]),
    "clip": (lambda: __import__("tests.tiny_models", fromlist=["x"]).tiny_clip(), CLIP_TARGETS),
    "mlp": (lambda: _sequential_mlp(), ["mlp.0", "mlp.2"]),  # one role and shape, PEFT categories mlp_0 / mlp_2
}


def _sequential_mlp():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.mlp = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    return model


def _layer_outputs(model, names, seed=7):
    """Each adapted layer on its own random input (no forward signature needed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for n in names:
            mod = model.get_submodule(n)
            base = getattr(mod, "base_layer", mod)
            d_in = base.in_features if hasattr(base, "in_features") else base.weight.shape[0]
            out[n] = mod(torch.randn(3, 5, d_in, generator=g))
    return out


def _peft_targets(model, targets):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(
        n == t or n.endswith("." + t) for t in targets)]


@pytest.mark.parametrize("which", list(FILE_MODELS))
def test_peft_file_without_projections_rebuilds_peft_bases(tmp_path, which):
    """A PEFT folder saved with save_projection=False: diffadapt regenerates PEFT's own bases
    (its categories, one weight per block index), so outputs equal PEFT's."""
    import diffadapt as da

    build, targets = FILE_MODELS[which]
    pm = peft_model(build(), targets, save_projection=False, sparse_rate=0.05)
    randomize_peft(pm, seed=4)
    pm.save_pretrained(tmp_path / "peft")
    assert not any("frod_V" in k for k in get_peft_model_state_dict(pm))
    names = _peft_targets(build(), targets)
    want = _layer_outputs(pm.base_model.model, names)
    ours = build()
    da.load_adapter(ours, tmp_path / "peft", "a")
    got = _layer_outputs(ours, names)
    base = _layer_outputs(build(), names)
    assert max(rel_err(want[n], base[n]) for n in names) > 0.05
    for n in names:
        assert rel_err(got[n], want[n]) < 1e-5, n


@pytest.mark.parametrize("which", list(FILE_MODELS))
def test_peft_mode_files_give_diffadapt_outputs_in_peft(tmp_path, which):
    """FRoD made by diffadapt in projection_mode='peft', trained (perturbed), saved with and
    without its bases: PEFT loading the folder computes the same layer outputs as diffadapt."""
    import diffadapt as da
    from peft import PeftModel

    build, targets = FILE_MODELS[which]
    names = _peft_targets(build(), targets)
    for save_projection in (True, False):
        ours = build()
        cfg = FRoDConfig(target_modules=targets, projection_mode="peft", sparse_rate=0.05, progressbar=False,
                         save_projection=save_projection)
        da.add_adapter(ours, cfg, "a")
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in da.model.adapter_parameters(ours, "a").values():
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g)).add_(0.1 * torch.randn(p.shape, generator=g))
        want = _layer_outputs(ours, names)
        folder = tmp_path / f"ours_{save_projection}"
        da.save_adapter(ours, folder, "a")
        reloaded = PeftModel.from_pretrained(build(), folder)
        got = _layer_outputs(reloaded.base_model.model, names)
        base = _layer_outputs(build(), names)
        assert max(rel_err(want[n], base[n]) for n in names) > 0.05
        for n in names:
            assert rel_err(got[n], want[n]) < 1e-5, (save_projection, n)
        mine = build()
        da.load_adapter(mine, folder, "a")
        again = _layer_outputs(mine, names)
        for n in names:
            assert rel_err(again[n], want[n]) < 1e-6, (save_projection, n)


@pytest.mark.parametrize("mode", ["peft", "fast"])
def test_basis_shared_across_peft_categories_is_written_as_peft_writes_it(tmp_path, mode):
    """``mlp.0`` / ``mlp.2``: PEFT keeps one V and pattern per category (``mlp_0``, ``mlp_2``); diffadapt's
    fast mode shares one basis between them (one role and shape). Either way the folder holds PEFT's keys,
    shapes and dtypes, one tensor each (a shared basis copied per key), PEFT loads it without missing or
    unexpected keys, and diffadapt's load gives the saved outputs with the basis shared again."""
    from peft import PeftModel
    from safetensors.torch import load_file

    import diffadapt as da
    from diffadapt.model import hosts

    build, targets = FILE_MODELS["mlp"]
    pm = peft_model(build(), targets, sparse_rate=0.05)
    pm.save_pretrained(tmp_path / "peft")
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = build()
    da.add_adapter(ours, FRoDConfig(target_modules=targets, projection_mode=mode, sparse_rate=0.05,
                                    progressbar=False), "a")
    randomize_peft(ours, seed=3)
    want = _layer_outputs(ours, targets)
    base = _layer_outputs(build(), targets)
    assert min(rel_err(want[n], base[n]) for n in targets) > 0.05
    da.save_adapter(ours, tmp_path / mode, "a")
    mine = load_file(str(tmp_path / mode / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    same_v = torch.equal(mine["base_model.frod_V.mlp_0"], mine["base_model.frod_V.mlp_2"])
    assert same_v == (mode == "fast")
    if mode == "peft":  # PEFT's own bases
        assert all(torch.equal(mine[k], v) for k, v in theirs.items() if k.startswith("base_model.frod_"))
    result = PeftModel.from_pretrained(build(), tmp_path / mode).load_adapter(tmp_path / mode, "again")
    assert not result.missing_keys and not result.unexpected_keys
    back = build()
    da.load_adapter(back, tmp_path / mode, "a")
    slots = [host.adapters["a"] for _, host in hosts(back)]
    assert (slots[0].buffers_dict()["V"] is slots[1].buffers_dict()["V"]) == (mode == "fast")
    got = _layer_outputs(back, targets)
    for n in targets:
        assert torch.equal(got[n], want[n]), n


def test_fast_mode_says_it_is_not_for_peft(tmp_path):
    import diffadapt as da

    build, targets = FILE_MODELS["clip"]
    model = build()
    da.add_adapter(model, FRoDConfig(target_modules=targets, progressbar=False), "a")
    with pytest.warns(UserWarning, match=r"projection_mode='fast'.*PEFT computes U from a basis of its own"):
        da.save_adapter(model, tmp_path / "fast", "a")
    with pytest.raises(AdapterConfigError, match=r"save_projection=False needs projection_mode='peft'"):
        FRoDConfig(target_modules=targets, save_projection=False)


def test_peft_mode_refuses_what_peft_cannot_build():
    """SD-UNet widths: PEFT's category 'attn1_to_q' would concatenate 32- and 64-wide weights."""
    import diffadapt as da
    from tests import tiny_models as tm

    model = tm.tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FRoDConfig(target_modules=["to_q"], projection_mode="peft", progressbar=False)
    with pytest.raises(AdapterConfigError, match=r"category 'attn1_to_q'.*input widths \[32, 64\].*'fast'"):
        da.add_adapter(model, cfg, "a")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    da.add_adapter(model, FRoDConfig(target_modules=["to_q"], progressbar=False), "a")  # fast mode: fine


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (9, 9)])
def test_delta_weight_backward_is_the_adjoint_of_delta_weight(shape):
    """dM = U^T G V read at the diagonal and the S cells (what the runtime's folded linear uses, W + dW
    kept from forward) against autograd through U M V^T, float64, repeated cells included."""
    d_out, d_in = shape
    prep, params, layer = _random_prep(d_out, d_in, 0.3, 0.7)
    prep = prep._replace(rows=torch.cat([prep.rows, prep.rows[:2]]), cols=torch.cat([prep.cols, prep.cols[:2]]),
                         vals=torch.cat([prep.vals, prep.vals[:2]]))  # a cell listed twice adds up
    prep = prep._replace(lam=prep.lam.detach().requires_grad_(True), vals=prep.vals.detach().requires_grad_(True))
    grad = torch.randn(d_out, d_in, dtype=torch.float64)
    want = torch.autograd.grad(FRoD.delta_weight(prep, torch.float64), (prep.lam, prep.vals), grad)
    got = FRoD.delta_weight_backward(prep, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert FRoD.keep_folded_weight(torch.zeros(3, d_in, dtype=torch.float64), prep)  # W + dW kept: no U M V^T rebuild


def test_delta_weight_backward_keeps_no_transient_that_grows_with_the_s_cells():
    """The S-cell adjoint's transients are bounded by the d_in x max(d_in, d_out) products, whatever
    nnz: reading the cells by gathering nnz x d_out factor rows made three 2.3 GB float32 transients
    for SD3's 1536 x 6144 layers. Here nnz x d_out = 1,720 > 24 x 24, and the values are autograd's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    prep, params, layer = _random_prep(10, 24, 0.3, 0.7, seed=1)
    prep = prep._replace(lam=prep.lam.detach().requires_grad_(True), vals=prep.vals.detach().requires_grad_(True))
    assert prep.rows.numel() * 10 > 24 * 24
    grad = torch.randn(10, 24, dtype=torch.float64)
    with Largest() as seen:
        got = FRoD.delta_weight_backward(prep, grad)
    assert seen.numel <= 24 * 24, seen.numel
    want = torch.autograd.grad(FRoD.delta_weight(prep, torch.float64), (prep.lam, prep.vals), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

# ---------------------------------------------------------------- the sparse weight path (dW, its adjoint)
@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (9, 9)])
def test_sparse_weight_path_equals_the_dense_one(monkeypatch, shape):
    """Where dW = U M V^T and its adjoint run with S as a compressed-row matrix (one GEMM each and a
    sparse product), they give the two dense GEMMs' values: float64 to 1e-12 with a repeated cell, a
    bf16 merge as the dense one rounds it; a build that autograd has to go through stays dense, and its
    gradient is the sparse adjoint's."""

    d_out, d_in = shape
    prep, params, layer = _random_prep(d_out, d_in, 0.05, 0.7)
    rows, cols, vals = (torch.cat([t, t[:1]]) for t in (prep.rows, prep.cols, prep.vals))
    layout = _frod_basis._csr_layout(torch.stack([rows, cols]), d_in)
    prep = prep._replace(rows=rows, cols=cols, vals=vals, layout=(layout["s_order"], layout["s_crow"]))
    grad = torch.randn(d_out, d_in, dtype=torch.float64)
    w16 = layer.weight.detach().to(torch.bfloat16)

    def run():
        return (FRoD.delta_weight(prep, torch.float64), *FRoD.delta_weight_backward(prep, grad),
                FRoD.apply_to_weight(w16, prep))

    assert not frod_module._sparse_weight(prep)  # narrow: the dense GEMMs
    dense = run()
    monkeypatch.setattr(frod_module, "_SPARSE_WEIGHT_MIN_WIDTH", 8)
    assert frod_module._sparse_weight(prep)
    sparse = run()
    for a, b in zip(sparse[:3], dense[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert sparse[3].dtype == torch.bfloat16
    torch.testing.assert_close(sparse[3].float(), dense[3].float(), rtol=8e-3, atol=0)
    lam, vals = prep.lam.detach().requires_grad_(True), prep.vals.detach().requires_grad_(True)
    want = torch.autograd.grad(FRoD.delta_weight(prep._replace(lam=lam, vals=vals), torch.float64), (lam, vals), grad)
    for a, b in zip(sparse[1:3], want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sparse_weight_path_trains_and_merges_as_the_dense_one(monkeypatch):
    """Through the runtime: a step on the folded weight path (dW built sparse in forward, the sparse
    adjoint in backward) and a merge give the dense path's outputs and gradients (float64)."""
    import diffadapt as da

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 10), nn.GELU(), nn.Linear(10, 24)).double().requires_grad_(False)
    x = torch.randn(4, 64, 24, dtype=torch.float64)
    calls = []
    sparse_build = frod_module._sparse_delta_weight
    monkeypatch.setattr(frod_module, "_sparse_delta_weight", lambda p, dtype: calls.append(1) or sparse_build(p, dtype))

    def run(width):
        monkeypatch.setattr(frod_module, "_SPARSE_WEIGHT_MIN_WIDTH", width)
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        cfg = FRoDConfig(target_modules=["0", "2"], sparse_rate=0.05, init_weights=False, progressbar=False)
        da.add_adapter(model, cfg, "a")
        y = model(x)
        y.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in da.adapter_parameters(model, "a").items()}
        da.merge_adapters(model)
        with torch.no_grad():
            merged = model(x)
        da.unmerge_adapters(model)
        return y.detach(), merged, grads

    want = run(1 << 30)
    assert not calls
    got = run(8)
    assert len(calls) >= 4  # both layers, forward and merge
    assert uses_weight_path(256, 10, 24, sparse_nnz(24, 0.05)) and uses_weight_path(256, 24, 10, sparse_nnz(10, 0.05))
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- the sparse core (basis path)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparse_core_equals_the_dense_core(monkeypatch, dtype):
    """Where S runs as a compressed-row matrix (wide layers, few tokens) the basis path gives the dense
    core's values and gradients: float64 to 1e-12, a repeated cell included (it adds up, and each of
    its values gets the cell's gradient); bf16 activations stay bf16 (the sparse products in float32)."""

    prep, params, layer = _random_prep(24, 32, 0.05, 0.7)
    rows, cols, vals = (torch.cat([t, t[:1]]) for t in (prep.rows, prep.cols, prep.vals))
    layout = _frod_basis._csr_layout(torch.stack([rows, cols]), 32)
    prep = prep._replace(rows=rows, cols=cols, lam=prep.lam.detach().to(dtype).requires_grad_(True),
                         vals=vals.detach().to(dtype).requires_grad_(True), layout=(layout["s_order"], layout["s_crow"]))
    x = torch.randn(2, 5, 32, dtype=torch.float64).to(dtype).requires_grad_(True)
    cast = prep._replace(V=prep.V.to(dtype), U=prep.U.to(dtype))

    def run():
        y = FRoD.delta_output(x, cast)
        return (y,) + torch.autograd.grad(y, (x, cast.lam, cast.vals), torch.ones_like(y))

    assert not frod_module.uses_weight_path(10, 24, 32)  # the basis path
    dense = run()
    monkeypatch.setattr(frod_module, "_SPARSE_CORE_MIN_WIDTH", 8)
    assert frod_module._sparse_core(x @ cast.V, cast)
    sparse = run()
    for a, b in zip(sparse, dense):
        assert a.dtype == b.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())
    with torch.no_grad():  # the no-autograd branch too
        torch.testing.assert_close(FRoD.delta_output(x, cast), sparse[0], rtol=1e-12 if dtype == torch.float64 else 0,
                                   atol=1e-12 if dtype == torch.float64 else 0)


def test_sparse_core_stays_out_of_compiled_graphs(monkeypatch):
    """Sparse tensors do not trace: a compiled (fullgraph) layer takes the dense core and the dense dW,
    with the same values."""

    monkeypatch.setattr(frod_module, "_SPARSE_CORE_MIN_WIDTH", 8)
    cfg, base, params, buffers = make(init_weights=False)
    layer = Adapted(base, params, buffers, cfg).eval()
    x = torch.randn(1, 6, 24)
    monkeypatch.setattr(frod_module, "_SPARSE_WEIGHT_MIN_WIDTH", 8)
    prep = FRoD.prepare(cfg, params, buffers, 1.0)
    assert frod_module._sparse_core(x @ prep.V, prep)  # eager takes the sparse core here
    assert frod_module._sparse_weight(prep)  # and a sparse dW on the weight path
    many = torch.randn(2, 64, 24)
    assert uses_weight_path(128, 20, 24, prep.rows.numel())
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for inp in (x, many):
            torch.testing.assert_close(compiled(inp), layer(inp), rtol=1e-5, atol=1e-6)
