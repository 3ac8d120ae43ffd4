"""LyCORIS / kohya / ComfyUI files: import OFT/BOFT made by LyCORIS itself, export every method so
LyCORIS' own loader and diffusers' LoRA loader reproduce diffadapt's outputs, round trips, refusals.

The LyCORIS side always runs lycoris-lora's own code (network creation, saving, loading, forward):
reference outputs are LyCORIS applying its adapter, never a re-derivation of its math.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import diffadapt as da
from diffadapt import cli
from diffadapt.artifact import components
from diffadapt.checkpoint import CheckpointError
from diffadapt.formats import lycoris, names
from diffadapt.formats import lycoris_export
from diffadapt.formats.lycoris_export import save_lycoris
from diffadapt.pipeline import load_lycoris
from diffadapt.methods import AdapterConfigError
from diffadapt.methods.base import LayerSpec
from diffadapt.methods.boft import BOFT, BOFTConfig
from diffadapt.methods.oft import OFT, OFTConfig
from tests import contract
from tests import tiny_pipelines as tp
from tests.tiny_models import randomise, unet_inputs

lycoris_kohya = pytest.importorskip("lycoris.kohya")
from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402
from lycoris.wrapper import LycorisNetwork  # noqa: E402

lycoris_logger.setLevel(logging.ERROR)
# LyCORIS' built-in presets also match diffusers' TimestepEmbedding (an "Anima" class) and then
# wrap time_embedding twice: target the SD blocks explicitly (what its "full" preset means for SD).
SD_PRESET = dict(
    enable_conv=True,
    unet_target_module=["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    unet_target_name=["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    text_encoder_target_module=["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    text_encoder_target_name=[],
)
TOKENS = torch.randint(0, tp.CLIP_VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(3))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def close(ours, theirs, tol=1e-5):
    for a, b in zip(ours, theirs):
        assert rel(a, b) < tol, rel(a, b)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded (docs/design.md, "Working offline"): two OpenMP threads on the two shared, busy cores
    stall for seconds per tiny op here; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd():
    return tp.build_sd(0)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """SD_PRESET as the toml file LyCORIS' create_network reads (it re-applies its preset)."""
    path = tmp_path_factory.mktemp("lycoris") / "sd_preset.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in SD_PRESET.items()) + "\n")
    return str(path)


def fresh(pipe):
    """A copy of ``pipe`` with its own (deep-copied) models."""
    new = copy.copy(pipe)
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module):
            setattr(new, name, copy.deepcopy(module))
    return new


def sd_outputs(unet, te):
    with torch.no_grad():
        return unet(**unet_inputs()).sample, te(TOKENS).last_hidden_state


def clip_holder(te):
    """The text encoder under a ``text_model`` attribute: transformers 5 dropped that level inside
    CLIPTextModel, real kohya/LyCORIS files (and UIs) keep it; LyCORIS names modules by path."""
    holder = nn.Module()
    holder.text_model = te
    return holder


def lycoris_sd_file(pipe, path, algo, preset, seed=0, **kwargs):
    """LyCORIS' kohya network on (copies of) ``pipe``'s UNet and text encoder, blocks randomised.
    Returns LyCORIS' own outputs with it applied."""
    LycorisNetworkKohya.apply_preset(SD_PRESET)
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    holder = clip_holder(te)
    net = create_network(1.0, 4, 1, None, holder, unet, algo=algo, preset=preset, **kwargs)
    net.apply_to(holder, unet, True, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("oft_blocks"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("rescale"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    outputs = sd_outputs(unet, te)
    net.save_weights(str(path), torch.float32, {})
    return outputs


def add(pipe, config, name, seed=0):
    for module in (pipe.unet, pipe.text_encoder):
        da.add_adapter(module, config, name, preset="attention+ff")
    randomise(pipe, name, seed)


def rename(src, dst, fn):
    save_file({fn(k): v for k, v in load_file(str(src)).items()}, str(dst))


# -- 0. the output-side convention itself -----------------------------------------------------------
OUTPUT_SIDE = [
    (OFT, OFTConfig(oft_block_size=4, rotation_side="output", init_weights=False)),
    (BOFT, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output", constraint=0.05,
                      init_weights=False)),
]


@pytest.mark.parametrize("method,config", OUTPUT_SIDE, ids=["oft", "boft-constrained"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_output_side_rotation(method, config, kind):
    """W_eff = diag(s) R W: orthogonal on the output channels (W_eff^T W_eff = W^T W at s = 1),
    bias untouched, merged == live, strength 0 the base layer bit for bit, float64 gradients."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 16) if kind == "linear" else nn.Conv2d(2, 16, 3, padding=1)
    layer = layer.double()
    x = torch.randn(3, 6, dtype=torch.float64) if kind == "linear" else torch.randn(1, 2, 5, 5, dtype=torch.float64)
    _, params, buffers = contract.init(method, config, layer)
    prep = method.prepare(config, params, buffers, 1.0)
    w = contract.weight_2d(layer)
    w_eff = method.apply_to_weight(w, prep)
    if method is OFT:  # no scale: a pure rotation of the output channels
        torch.testing.assert_close(w_eff.T @ w_eff, w.T @ w)
    live = contract.forward(method, config, layer, params, buffers, x)
    torch.testing.assert_close(live, contract.merged_forward(method, config, layer, params, buffers, x))
    zero = contract.forward(method, config, layer, params, buffers, x, strength=0.0)
    base = torch.nn.functional.linear(x, layer.weight) + layer.bias if kind == "linear" else layer(x)  # runtime's order
    assert torch.equal(zero, base)
    nobias = copy.deepcopy(layer)
    nobias.bias = None
    shift = live - contract.forward(method, config, nobias, params, buffers, x)
    bias = layer.bias.view(1, -1, 1, 1) if kind == "conv2d" else layer.bias
    torch.testing.assert_close(shift, bias.expand_as(shift))  # the bias is never rotated
    names_ = list(params)
    inputs = tuple(params[n].detach().requires_grad_() for n in names_)
    assert torch.autograd.gradcheck(
        lambda *ps: contract.forward(method, config, layer, dict(zip(names_, ps)), buffers, x, strength=0.7), inputs
    )


def test_output_side_compiles_and_validates():
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output", init_weights=False)
    layer = nn.Linear(8, 16)
    _, params, buffers = contract.init(BOFT, config, layer)

    class Adapted(nn.Module):
        def forward(self, x, strength):
            return contract.forward(BOFT, config, layer, params, buffers, x, strength=strength)

    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(Adapted(), fullgraph=True)(x, torch.tensor(0.6)),
                                   Adapted()(x, torch.tensor(0.6)))
    with pytest.raises(AdapterConfigError, match="rotation_side must be 'input'.*or 'output'"):
        BOFTConfig(rotation_side="both")
    with pytest.raises(AdapterConfigError, match="constraint is LyCORIS' norm limit"):
        OFTConfig(constraint=-1.0)
    with pytest.raises(AdapterConfigError, match="cannot be combined with block_share"):
        OFTConfig(constraint=0.1, block_share=True)
    with pytest.raises(AdapterConfigError, match="boft_block_size=5 does not divide out_features=16"):
        BOFTConfig(boft_block_size=5, rotation_side="output").check_layer(LayerSpec("l", "linear", 16, 10))
    BOFTConfig(boft_block_size=5, rotation_side="input").check_layer(LayerSpec("l", "linear", 16, 10))


# -- 1. files LyCORIS made, loaded by diffadapt --------------------------------------------------------
@pytest.mark.parametrize("algo,kwargs", [
    ("diag-oft", dict(constraint=2e-3)),  # binds on some layers, not others
    ("boft", dict(rescaled=True)),
    ("diag-oft", dict(rescaled=True)),  # 3-d blocks with a rescale: BOFT with one factor
])
def test_lycoris_file_loads_and_matches_lycoris(sd, tmp_path, preset, algo, kwargs):
    path = tmp_path / "lyco.safetensors"
    theirs = lycoris_sd_file(sd, path, algo, preset, **kwargs)
    base = sd_outputs(sd.unet, sd.text_encoder)
    pipe = fresh(sd)
    da.load_adapter(pipe, path, "lyco")
    info = da.list_adapters(pipe)["lyco"]
    assert set(info) == {"unet", "text_encoder"}
    expected = "oft" if algo == "diag-oft" and "rescaled" not in kwargs else "boft"
    assert {c["method"] for c in info.values()} == {expected}
    config = da.model.adapter_state(pipe.unet).configs["lyco"]
    assert config.rotation_side == "output"
    ours = sd_outputs(pipe.unet, pipe.text_encoder)
    close(ours, theirs)
    assert min(rel(a, b) for a, b in zip(theirs, base)) > 1e-2  # the adapter really does something
    if "constraint" in kwargs:  # LyCORIS' meaning: radius alpha * out_features, on some layers only
        tensors = load_file(str(path))
        bound = [k for k, v in tensors.items() if k.endswith("oft_blocks")
                 and (v - v.mT).norm() > kwargs["constraint"] * v.shape[0] * v.shape[1]]
        assert 0 < len(bound) < sum(k.endswith("oft_blocks") for k in tensors)
        assert config.constraint == float(torch.tensor(kwargs["constraint"]))  # the file stores float32


def test_imported_adapter_takes_every_verb(sd, tmp_path, preset):
    path = tmp_path / "boft.safetensors"
    lycoris_sd_file(sd, path, "boft", preset, seed=1, rescaled=True, constraint=1e-2)
    pipe = fresh(sd)
    originals = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    base = sd_outputs(pipe.unet, pipe.text_encoder)
    da.load_adapter(pipe, path, "a")
    live = sd_outputs(pipe.unet, pipe.text_encoder)
    da.set_adapters(pipe, "a", 0.0)
    assert all(torch.equal(x, y) for x, y in zip(sd_outputs(pipe.unet, pipe.text_encoder), base))
    da.set_adapters(pipe, "a", 0.5)
    half = sd_outputs(pipe.unet, pipe.text_encoder)
    assert all(rel(h, b) > 1e-4 and rel(h, l) > 1e-4 for h, b, l in zip(half, base, live))
    da.set_adapters(pipe, "a", 1.0)
    da.merge_adapters(pipe)
    close(sd_outputs(pipe.unet, pipe.text_encoder), live)
    da.unmerge_adapters(pipe)
    da.disable_adapters(pipe)
    assert all(torch.equal(x, y) for x, y in zip(sd_outputs(pipe.unet, pipe.text_encoder), base))
    da.enable_adapters(pipe)
    da.hotswap_adapter(pipe, path, "a")  # same structure: swaps in place
    da.unload(pipe)
    assert all(torch.equal(p, originals[n]) for n, p in pipe.unet.named_parameters())


def test_name_styles_and_prefixes(sd, tmp_path, preset):
    """The same LyCORIS file with other spellings of the same modules: ldm UNet paths (kohya's
    SDXL style) with transformers-5 CLIP paths (no ``text_model_``), and kohya OFT's ``oft_unet_``
    prefix -- all load to the same function."""
    path = tmp_path / "oft.safetensors"
    theirs = lycoris_sd_file(sd, path, "diag-oft", preset, seed=2, constraint=1e-2)
    ldm = {names.flat(k): names.flat(v) for k, v in names.ldm_unet_paths(sd.unet).items()}

    def ldm_style(key):
        module, _, suffix = key.partition(".")
        if module.startswith("lora_unet_"):
            return f"lora_unet_{ldm[module.removeprefix('lora_unet_')]}.{suffix}"
        return key.replace("lora_te_text_model_", "lora_te_")

    for variant, fn in [("ldm", ldm_style), ("kohya_oft", lambda k: k.replace("lora_unet_", "oft_unet_"))]:
        renamed = tmp_path / f"{variant}.safetensors"
        rename(path, renamed, fn)
        assert set(load_file(str(renamed))) != set(load_file(str(path)))
        pipe = fresh(sd)
        load_lycoris(pipe, renamed, variant)
        close(sd_outputs(pipe.unet, pipe.text_encoder), theirs)


def test_sdxl_both_text_encoders(tmp_path, preset):
    pipe = tp.build_sdxl(0)
    LycorisNetworkKohya.apply_preset(SD_PRESET)
    unet, te1, te2 = (copy.deepcopy(m) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    tes = [clip_holder(te1), te2]  # te2 (CLIPTextModelWithProjection) keeps text_model. itself
    net = create_network(1.0, 4, 1, None, tes, unet, algo="boft", rescaled=True, preset=preset)
    net.apply_to(tes, unet, True, True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path / "sdxl.safetensors"
    net.save_weights(str(path), torch.float32, {})
    keys = load_file(str(path))
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)

    def outputs(te1_, te2_):
        with torch.no_grad():
            return te1_(TOKENS).last_hidden_state, te2_(TOKENS).text_embeds

    theirs = outputs(te1, te2)
    ours = fresh(pipe)
    da.load_adapter(ours, path, "x")
    assert set(da.list_adapters(ours)["x"]) == {"unet", "text_encoder", "text_encoder_2"}
    close(outputs(ours.text_encoder, ours.text_encoder_2), theirs)


def dit_inputs(kind):
    g = torch.Generator().manual_seed(5)
    if kind == "sd3":
        return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([10]))
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_dit_files_with_diffusers_names(tmp_path, kind):
    """LyCORIS' wrapper on a DiT writes ``lycoris_<diffusers path>``; OneTrainer / diffusers-style
    files use ``lora_transformer_`` / ``transformer.``: all three load into the pipeline."""
    pipe = tp.build_sd3(0, with_t5=False) if kind == "sd3" else tp.build_flux(0)
    model = copy.deepcopy(pipe.transformer)
    LycorisNetwork.apply_preset(dict(enable_conv=False, target_module=[], lora_prefix="lycoris",
                                     target_name=[r".*attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj)$", r".*proj_mlp$"]))
    net = LycorisNetwork(model, lora_dim=4, alpha=1, network_module="boft" if kind == "flux" else "diag-oft", rescaled=True)
    net.apply_to()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
        theirs = model(**dit_inputs(kind)).sample
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    table = names.module_table(model)
    variants = {
        "lycoris_": lambda k: k,
        "lora_transformer_": lambda k: k.replace("lycoris_", "lora_transformer_", 1),
        "transformer.": lambda k: "transformer." + table[k.partition(".")[0].removeprefix("lycoris_")] + "." + k.partition(".")[2],
    }
    for prefix, fn in variants.items():
        renamed = tmp_path / f"{prefix}.safetensors"
        rename(path, renamed, fn)
        ours = fresh(pipe)
        da.load_adapter(ours, renamed, "x")
        with torch.no_grad():
            assert rel(ours.transformer(**dit_inputs(kind)).sample, theirs) < 1e-5, prefix


# -- 2. files diffadapt wrote, loaded by LyCORIS and diffusers ----------------------------------------
def lycoris_apply(pipe, path):
    """LyCORIS' own loader (kohya entry point) on copies of the UNet / text encoder."""
    LycorisNetworkKohya.apply_preset(SD_PRESET)
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    holder = clip_holder(te)
    net, _ = create_network_from_weights(1.0, str(path), None, holder, unet)
    net.apply_to(holder, unet, True, True)
    return sd_outputs(unet, te), len(net.unet_loras) + len(net.text_encoder_loras)


@pytest.mark.parametrize("config", [
    da.OFTConfig(oft_block_size=4, rotation_side="output"),
    da.OFTConfig(oft_block_size=4, rotation_side="output", constraint=10.0),  # never binds: alpha is kept
    da.OFTConfig(oft_block_size=4, rotation_side="output", constraint=2e-3),  # binds: baked, alpha 0
    da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output"),  # padded to log2(N)+1
], ids=["oft", "oft-loose-constraint", "oft-tight-constraint", "boft"])
def test_exported_rotations_load_in_lycoris(sd, tmp_path, config):
    pipe = fresh(sd)
    add(pipe, config, "x")
    ours = sd_outputs(pipe.unet, pipe.text_encoder)
    path = tmp_path / "x.safetensors"
    report = save_lycoris(pipe, path, "x")
    layers = sum(c["layers"] for c in da.list_adapters(pipe)["x"].values())
    assert report["written_as"] == {"oft_blocks": layers}
    theirs, loaded = lycoris_apply(sd, path)
    assert loaded == layers
    close(ours, theirs)
    tensors = load_file(str(path))
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    if config.constraint == 10.0:
        assert alphas == {10.0}
    assert_alpha_binds_in_no_consumer(tensors)


def assert_alpha_binds_in_no_consumer(tensors):
    """Oracles of the consumers' OFT norm limit, written from their behaviour: with Q = A - A^T,
    A1111 / kohya scale Q by (min(|Q|, alpha * out) + 1e-8) / (|Q| + 1e-8) -- even for alpha = 0,
    which wipes the rotation --, ComfyUI by alpha / |Q| when 0 < alpha < |Q|. Every module of an
    exported file must come through both unscaled, and must rotate."""
    for key, blocks in tensors.items():
        if not key.endswith(".oft_blocks"):
            continue
        alpha = float(tensors[key[: -len("oft_blocks")] + "alpha"])
        q = blocks - blocks.transpose(-1, -2)
        norm = torch.linalg.vector_norm(q.flatten())
        out = q.shape[-3] * q.shape[-1]  # blocks x block size (per factor for BOFT)
        a1111 = (torch.clamp(norm, max=alpha * out) + 1e-8) / (norm + 1e-8)
        assert a1111 == 1.0, key
        assert not (0 < alpha < norm), key  # ComfyUI leaves it alone
        assert norm > 0, key


@pytest.mark.parametrize("build", [tp.build_sd, tp.build_sdxl], ids=["sd", "sdxl-ldm-names"])
def test_exported_hra_lora_loads_in_diffusers(tmp_path, build):
    pipe = build(0)
    theirs = fresh(pipe)
    config = da.HRAConfig(r=4, init_weights=False)
    for module in (pipe.unet, pipe.text_encoder):
        da.add_adapter(module, config, "h", preset="attention+ff")
    path = tmp_path / "hra.safetensors"
    report = save_lycoris(pipe, path, "h")
    assert set(report["written_as"]) == {"lora"} and report["max_relative_error"] == 0.0
    if build is tp.build_sdxl:
        assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(path)))
    theirs.load_lora_weights(str(path))
    with torch.no_grad():
        close([pipe.text_encoder(TOKENS).last_hidden_state], [theirs.text_encoder(TOKENS).last_hidden_state])
    close([tp.generate(pipe)], [tp.generate(theirs)])
    theirs.disable_lora()
    assert rel(tp.generate(theirs), tp.generate(pipe)) > 1e-3


@pytest.mark.parametrize("config", [
    da.FourierFTConfig(n_frequency=40, init_weights=False),
    da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2),  # input side: no oft_blocks form
    da.get_method("frod").config_class(sparse_rate=0.05, progressbar=False),
    da.HRAConfig(r=2, init_weights=False),  # asked for as .diff
], ids=["fourierft", "boft-input", "frod", "hra"])
def test_diff_exports_equal_merged_weights(sd, tmp_path, config):
    unet = copy.deepcopy(sd.unet)
    da.add_adapter(unet, config, "d", preset="attention")
    randomise(unet, "d", scale=0.05)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    path = tmp_path / "d.safetensors"
    report = save_lycoris(unet, path, "d", rotations="diff")
    diffs = load_file(str(path))
    assert set(report["written_as"]) == {"diff"} and all(k.startswith("lora_unet_") for k in diffs)
    low = save_lycoris(unet, tmp_path / "low.safetensors", "d", lora_rank=2)
    if config.method == "hra":  # dW = W Q - W = -(W V) Y^T has rank r = 2: a rank-2 LoRA holds it exactly
        assert low["max_relative_error"] < 1e-5, low["max_relative_error"]
    else:  # full-rank (BOFT, FRoD) or rank-40 (FourierFT) updates: a rank-2 LoRA only approximates them
        assert 0 < low["max_relative_error"] < 1
    da.merge_adapters(unet)
    table = names.module_table(unet)
    for key, diff in diffs.items():
        path_ = table[key.partition(".")[0].removeprefix("lora_unet_")]
        weight = base[f"{path_}.base_layer.weight"]
        merged = unet.get_submodule(path_).base_layer.weight
        torch.testing.assert_close(weight + diff, merged, rtol=0, atol=2e-6 * merged.abs().max().item())


# -- 3. round trips and refusals ---------------------------------------------------------------------
def test_lycoris_round_trip_is_lossless(sd, tmp_path, preset):
    """LyCORIS file (kohya's ldm UNet names) -> diffadapt single file -> LyCORIS file: the same
    Q = A - A^T, rescale and alpha, bit for bit, under the same names; and diffadapt -> LyCORIS ->
    diffadapt gives back the same parameters."""
    made = tmp_path / "boft.safetensors"
    lycoris_sd_file(sd, made, "boft", preset, seed=4, rescaled=True, constraint=100.0)  # alpha kept: binds nowhere
    ldm = {names.flat(k): names.flat(v) for k, v in names.ldm_unet_paths(sd.unet).items()}
    src = tmp_path / "ldm.safetensors"  # without conv_in, the sorted-first ldm and diffusers names differ
    save_file({(f"lora_unet_{ldm[k.partition('.')[0][10:]]}.{k.partition('.')[2]}" if k.startswith("lora_unet_") else k): v
               for k, v in load_file(str(made)).items() if not k.startswith("lora_unet_conv_in.")}, str(src))
    adapter = da.read_pipeline_adapter(src, target=sd)
    for config, tensors in adapter.components.values():  # per-layer factor counts: the defaults are
        first = min(k for k in tensors if k.endswith("boft_R"))  # the sorted-first layer's (what loaders check)
        assert tensors[first].shape[0] == config.boft_n_butterfly_factor and config.overrides
    pipe = fresh(sd)
    da.load_adapter(pipe, adapter, "a")
    mine = tmp_path / "mine.safetensors"
    da.save_adapter(pipe, mine, "a")
    again = fresh(sd)
    da.load_adapter(again, mine, "a")
    back = tmp_path / "back.safetensors"
    save_lycoris(again, back, "a", unet_names="ldm")
    original, returned = load_file(str(src)), load_file(str(back))
    assert set(original) == set(returned)
    for key, value in original.items():
        if key.endswith("oft_blocks"):
            assert torch.equal(value - value.mT, returned[key] - returned[key].mT), key
        else:
            assert torch.equal(value, returned[key]), key

    pipe = fresh(sd)
    add(pipe, OFTConfig(oft_block_size=4, rotation_side="output"), "o", seed=5)
    out = tmp_path / "o.safetensors"
    save_lycoris(pipe, out, "o")
    reread = fresh(sd)
    da.load_adapter(reread, out, "o")
    for module, other in ((pipe.unet, reread.unet), (pipe.text_encoder, reread.text_encoder)):
        theirs = da.adapter_parameters(other, "o")
        for key, value in da.adapter_parameters(module, "o").items():
            assert torch.equal(value, theirs[key]), key  # oft_R is Q's upper triangle: bit for bit


def test_refusals(sd, tmp_path):
    pipe = fresh(sd)
    add(pipe, da.BOFTConfig(boft_block_size=4), "in")
    with pytest.raises(CheckpointError, match="cannot be written as oft_blocks: it rotates the layer input"):
        save_lycoris(pipe, tmp_path / "x.safetensors", "in", rotations="blocks")
    neumann = fresh(sd)
    add(neumann, da.OFTConfig(oft_block_size=4, rotation_side="output", use_cayley_neumann=True), "n")
    with pytest.raises(CheckpointError, match="Cayley-Neumann"):
        save_lycoris(neumann, tmp_path / "n.safetensors", "n", rotations="blocks")
    out = fresh(sd)
    add(out, da.OFTConfig(oft_block_size=4, rotation_side="output"), "o")
    with pytest.raises(AdapterConfigError, match="cannot be written in PEFT format"):
        da.save_adapter(out.unet, tmp_path / "peft", "o")
    # files diffadapt does not import, and names that do not resolve
    lora = tmp_path / "lora.safetensors"
    save_lycoris(pipe, lora, "in", lora_rank=2)
    with pytest.raises(CheckpointError, match="LoRA/LoCon.*OFT and BOFT adapters .oft_blocks. only"):
        da.load_adapter(fresh(sd), lora, "x")
    oft = tmp_path / "oft.safetensors"
    save_lycoris(out, oft, "o")
    with pytest.raises(CheckpointError, match="module names can only be resolved against the model"):
        da.read_pipeline_adapter(oft)
    bfl = tmp_path / "bfl.safetensors"
    rename(oft, bfl, lambda k: k.replace("lora_unet_down_blocks_0", "lora_unet_double_blocks_0"))
    target = fresh(sd)
    with pytest.raises(CheckpointError, match="match no module.*double_blocks"):
        da.load_adapter(target, bfl, "x")
    assert "_diffadapt" not in target.unet.__dict__  # nothing changed


def test_cli_convert_both_ways(sd, tmp_path, preset, capsys):
    model = tmp_path / "base"
    sd.save_pretrained(model, safe_serialization=True)
    src = tmp_path / "lyco.safetensors"
    theirs = lycoris_sd_file(sd, src, "diag-oft", preset, seed=6)
    mine = tmp_path / "mine.safetensors"
    assert cli.main(["convert", str(src), str(mine)]) == 2  # needs the base model
    assert "--model" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(mine), "--model", str(model)]) == 0
    assert cli.main(["convert", str(src), str(tmp_path / "peft"), "--to", "peft", "--model", str(model)]) == 2
    assert "cannot be written in PEFT format" in capsys.readouterr().err
    back = tmp_path / "comfy.safetensors"
    assert cli.main(["convert", str(mine), str(back), "--to", "comfyui"]) == 0  # oft_blocks need no model
    assert "oft_blocks" in capsys.readouterr().out
    pipe = fresh(sd)
    da.load_adapter(pipe, back, "c")
    close(sd_outputs(pipe.unet, pipe.text_encoder), theirs)
    boft = tmp_path / "boft_in.safetensors"
    add(pipe, da.BOFTConfig(boft_block_size=4), "in")
    da.save_adapter(pipe, boft, "in")
    assert cli.main(["convert", str(boft), str(tmp_path / "d.safetensors"), "--to", "lycoris"]) == 2
    assert "needs the base model's weights" in capsys.readouterr().err
    assert cli.main(["convert", str(boft), str(tmp_path / "d.safetensors"), "--to", "lycoris", "--model", str(model)]) == 0
    assert "as diff" in capsys.readouterr().out


def test_cli_convert_for_each_reader(sd, tmp_path, capsys):
    """--to a1111 / forge / kohya pick the forms that reader applies (BOFT 4-d blocks are unread by
    A1111 < 1.8 and Forge: .diff), and the CLI prints which readers load the file."""
    import json

    from safetensors import safe_open

    model = tmp_path / "base"
    sd.save_pretrained(model, safe_serialization=True)
    pipe = fresh(sd)
    add(pipe, da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output"), "b")
    src = tmp_path / "boft.safetensors"
    da.save_adapter(pipe, src, "b")
    for to in ("a1111", "forge", "kohya", "lycoris"):
        dst = tmp_path / f"{to}.safetensors"
        assert cli.main(["convert", str(src), str(dst), "--to", to, "--model", str(model)]) == 0
        out = capsys.readouterr().out
        with safe_open(dst, "pt") as f:
            keys, header = list(f.keys()), f.metadata()
        exported = json.loads(next(v for k, v in header.items() if k.startswith("diffadapt")))
        assert exported["consumer"] == (None if to == "lycoris" else to)
        reader = "kohya" if to in ("kohya", "lycoris") else to
        assert f"{reader}: loads" in out
        assert exported["consumers"][reader] == "loads"
        assert any(k.endswith(".diff") for k in keys) == (to in ("a1111", "forge"))
    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--to", "automatic"]) == 2


# -- 4. every consumer's patch logic, as oracles written from their behaviour --------------------------
# ComfyUI (comfy/weight_adapter/oft.py, boft.py, comfy/lora.py), A1111 (extensions-builtin/Lora:
# network_oft.py 1.8+ and before, network_full.py, network_lora.py), Forge (its 2024-08 patcher: no
# oft_blocks), kohya (through lycoris.kohya, which the header names: LyCORIS' own code above).
# Each takes the base weight W (float64, module layout), one module's tensors and a strength s;
# returns the patched weight, or None where that consumer does not load the module.
class NotLoaded(Exception):
    pass


def _cayley(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _butterfly(w, r, lerp=1.0):
    """LyCORIS' butterfly (its factor i mixes each run of 2^i b rows, halves interleaved)."""
    m, _, b, _ = r.shape
    eye = torch.eye(b, dtype=r.dtype)
    x = w
    for i in range(m):
        k = 2 ** i * (b // 2)
        bi = r[i] * lerp + (1 - lerp) * eye
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", bi, x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x


def _additive(w, g, s):
    if "diff" in g:
        return w + s * g["diff"].double().reshape(w.shape)
    up, down = g["lora_up.weight"].double(), g["lora_down.weight"].double()
    rank = down.shape[0]
    return w + s * float(g["alpha"]) / rank * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)


def comfy_apply(w, g, s=1.0):
    if "oft_blocks" not in g:
        return _additive(w, g, s)
    blocks, alpha = g["oft_blocks"].double(), float(g.get("alpha", 0.0))
    q = blocks - blocks.transpose(-1, -2)
    norm = torch.linalg.vector_norm(q.flatten()) + 1e-8
    if alpha > 0 and norm > alpha:  # the limit is alpha itself
        q = q * alpha / norm
    r = _cayley(q)
    if blocks.dim() == 3:  # rescale ignored; strength enters twice
        eye = torch.eye(blocks.shape[-1], dtype=w.dtype)
        diff = torch.einsum("knm,kn...->km...", s * r - s * eye, w.unflatten(0, (blocks.shape[0], -1))).flatten(0, 1)
        return w + s * diff
    out = _butterfly(w, r, s)
    if "rescale" in g:
        out = out * g["rescale"].double()
    return w + s * (out - w)


def a1111_apply(w, g, s=1.0, version=(1, 10)):
    if "oft_blocks" not in g:
        return _additive(w, g, s)
    blocks = g["oft_blocks"].double()
    if blocks.dim() == 4 and version < (1, 8):
        raise NotLoaded("A1111 < 1.8 transposes dims 1, 2 of the blocks and fails")  # caught, counted
    alpha = float(g["alpha"]) if "alpha" in g else 0.0
    q = blocks - blocks.transpose(-1, -2)
    limit = alpha * w.shape[0]
    if limit != 0 or version < (1, 8):  # before 1.8 the clamp always runs (0 wipes the rotation)
        norm = torch.linalg.vector_norm(q.flatten())
        q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
    r = _cayley(q)
    if blocks.dim() == 3:
        out = torch.einsum("knm,kn...->km...", r, w.unflatten(0, (blocks.shape[0], -1))).flatten(0, 1)
    else:
        out = _butterfly(w, r)
    if "rescale" in g and version >= (1, 8):
        out = g["rescale"].double().reshape(-1, *[1] * (w.dim() - 1)) * out
    return w + s * (out - w)  # finalize_updown: updown * scale (1) * multiplier


def forge_apply(w, g, s=1.0):
    if "oft_blocks" in g:
        raise NotLoaded("Forge's patcher has no oft_blocks type")
    return _additive(w, g, s)


ORACLES = {
    "comfyui": comfy_apply,
    "a1111": a1111_apply,
    "a1111<1.8": lambda w, g, s=1.0: a1111_apply(w, g, s, version=(1, 7)),
    "forge": forge_apply,
}


def module_groups(tensors):
    groups = {}
    for key, value in tensors.items():
        module, suffix = lycoris._split_key(key)
        groups.setdefault(module, {})[suffix] = value
    return groups


def oracle_check(base_pipe, merged_pipe, path, report, readers=ORACLES, strength=1.0):
    """Apply every reader's oracle to every module of the file at ``path``; where the report says
    the file loads there, the result must be diffadapt's merged weight (<= 1e-5 relative); where
    it says not, the oracle must indeed fail to load some module or disagree."""
    tensors = load_file(str(path))
    resolver = lycoris._Resolver(components(base_pipe), None)
    merged_mods = components(merged_pipe)
    for reader, oracle in readers.items():
        worst, failed = 0.0, 0
        for module, group in module_groups(tensors).items():
            component, mpath = resolver.resolve(module)
            w = resolver.mods[component].get_submodule(mpath).weight.detach().double()
            target = merged_mods[component].get_submodule(mpath)
            target = target.base_layer if hasattr(target, "base_layer") else target
            try:
                got = oracle(w, group, strength)
            except NotLoaded:
                failed += 1
                continue
            worst = max(worst, rel(got, target.weight.detach().double()))
        if report["consumers"][reader] == "loads":
            assert failed == 0 and worst <= 1e-5, (reader, failed, worst)
        else:
            assert failed or worst > 1e-5, (reader, report["consumers"][reader])


def safe_header(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def merged_copy(pipe, name):
    merged = fresh(pipe)
    da.merge_adapters(merged)
    return merged


CONSUMER_CASES = {
    "oft": da.OFTConfig(oft_block_size=4, rotation_side="output", constraint=10.0),  # alpha > 0 kept (item 10)
    "oft-wide-blocks": da.OFTConfig(oft_block_size=8, rotation_side="output"),  # 8 rows per block > 4 blocks
    "boft": da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output"),
    "boft-input": da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2),
    "hra": da.HRAConfig(r=2, init_weights=False),
    "fourierft": da.FourierFTConfig(n_frequency=40, init_weights=False),
    "frod": da.get_method("frod").config_class(sparse_rate=0.05, progressbar=False),
}


@pytest.mark.parametrize("consumer", [None, "comfyui", "a1111", "forge"], ids=["default", "comfyui", "a1111", "forge"])
@pytest.mark.parametrize("case", list(CONSUMER_CASES))
def test_exports_apply_in_every_consumer(sd, tmp_path, case, consumer):
    """Every method x every consumer the CLI names: the file, patched by each consumer's logic,
    gives diffadapt's merged weights wherever the header says it loads; where it does not, the
    export said so (warning + header) and that consumer's logic indeed does not reproduce it."""
    pipe = fresh(sd)
    config = CONSUMER_CASES[case]
    for module in (pipe.unet, pipe.text_encoder):
        da.add_adapter(module, config, "x", preset="attention+ff")
    randomise(pipe, "x", scale=0.005 if config.method in ("fourierft", "frod") else 0.2)  # FourierFT: scaling 150
    path = tmp_path / "x.safetensors"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = save_lycoris(pipe, path, "x", consumer=consumer)
    header = json.loads(safe_header(path)["diffadapt.lycoris-export"])
    assert header["consumers"] == report["consumers"] and "strength" in header["conventions"]
    merged = merged_copy(pipe, "x")
    oracle_check(sd, merged, path, report)
    missing = [r for r, v in report["consumers"].items() if v != "loads"]
    warned = [str(w.message) for w in record if "does not load exactly everywhere" in str(w.message)]
    assert bool(missing) == bool(warned) and all(f"{r}:" in warned[0] for r in missing)
    if consumer in ("a1111", "forge"):
        assert report["consumers"][consumer] == "loads" and report["consumers"]["a1111"] == "loads"
    if consumer == "a1111":
        assert report["consumers"]["a1111<1.8"] == "loads"
    if consumer is None:  # the default: what LyCORIS' own loader rebuilds, checked by running it
        assert report["consumers"]["lycoris"] == "loads"
        lycoris_weights_match(sd, merged, path, report["layers"])


def lycoris_weights_match(base, merged, path, layers):
    """LyCORIS' own loader (kohya entry point) on copies of ``base``: every module it builds from
    the file gives diffadapt's merged weight (<= 1e-5 relative), and it builds all of them."""
    LycorisNetworkKohya.apply_preset(SD_PRESET)
    unet, te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    net, _ = create_network_from_weights(1.0, str(path), None, clip_holder(te), unet)
    net.apply_to(clip_holder(te), unet, True, True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == layers
    resolver = lycoris._Resolver(components(base), None)
    mods = components(merged)
    for module in (*net.unet_loras, *net.text_encoder_loras):
        component, mpath = resolver.resolve(module.lora_name)
        target = mods[component].get_submodule(mpath)
        target = target.base_layer if hasattr(target, "base_layer") else target
        weight, _ = module.get_merged_weight(1.0, target.weight.shape, target.weight.device)
        assert rel(weight.double().reshape(target.weight.shape), target.weight.double()) <= 1e-5, module.lora_name


def test_lycoris_layouts_exact_or_refused(tmp_path):
    """Item 15: OFT with more rows per block than blocks goes out as one 4-d factor of wider blocks
    (exact; LyCORIS' loader rebuilds it); a BOFT block count that is not a power of two has no
    LyCORIS layout: .diff with the model, a one-line refusal naming the layer and shapes without."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Linear(24, 32))
    da.add_adapter(model, da.OFTConfig(oft_block_size=8, rotation_side="output", target_modules=["1"]), "o")
    randomise(model, "o")
    tensors, _, report = lycoris_export.lycoris_state_dict(model, "o")
    blocks = tensors["lycoris_1.oft_blocks"]
    assert blocks.shape == (3, 4, 8, 8) and lycoris_export.lycoris_layout(blocks) is None
    assert report["consumers"]["lycoris"] == "loads"
    merged = copy.deepcopy(model)
    da.merge_adapters(merged)
    w = model.get_submodule("1").base_layer.weight.detach().double()
    target = merged.get_submodule("1").base_layer.weight.double()
    assert rel(comfy_apply(w, {"oft_blocks": blocks, "alpha": tensors["lycoris_1.alpha"]}), target) <= 1e-5
    from lycoris.modules.boft import ButterflyOFTModule  # LyCORIS' own BOFT module rebuilds it from the tensors

    with torch.no_grad():
        built = ButterflyOFTModule.make_module_from_state_dict(
            "x", copy.deepcopy(model.get_submodule("1").base_layer), blocks, None, tensors["lycoris_1.alpha"])
        assert rel(built.get_merged_weight(1.0)[0].double(), target) <= 1e-5
    with pytest.warns(UserWarning, match="lycoris: 1 of 1 layers not applied: LyCORIS: its diag-oft swaps"):
        tensors, _, report = lycoris_export.lycoris_state_dict(model, "o", consumer="comfyui")
    assert tensors["lycoris_1.oft_blocks"].shape == (4, 8, 8)

    boft = nn.Sequential(nn.Linear(6, 24))
    da.add_adapter(boft, da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output",
                                       target_modules=["0"]), "b")
    randomise(boft, "b")
    _, _, report = lycoris_export.lycoris_state_dict(boft, "b")
    assert report["written_as"] == {"diff": 1} and "written as .diff" in " ".join(report["notes"])
    with pytest.raises(CheckpointError, match=r"^model\.0: no exact oft_blocks layout that LyCORIS loads for this BOFT "
                                              r"\(oft_blocks \(2, 6, 4, 4\), 24 output channels: its BOFT needs"):
        lycoris_export.lycoris_state_dict(boft, "b", rotations="blocks")
    tensors, _, _ = lycoris_export.lycoris_state_dict(boft, "b", consumer="comfyui")
    assert tensors["lycoris_0.oft_blocks"].shape == (2, 6, 4, 4)  # ComfyUI reads any layout


def test_strength_conventions_documented():
    """Item 17: strength s != 1 means different things: diffadapt Cayley(s S); LyCORIS / A1111 /
    kohya W + s (R^T W - W); ComfyUI W + s^2 (R^T W - W) -- the header says so, the oracles
    show it, and diffadapt matches neither between 0 and 1."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 8)
    model = nn.Sequential(layer)
    da.add_adapter(model, da.OFTConfig(oft_block_size=2, rotation_side="output", target_modules=["0"]), "o")
    randomise(model, "o", scale=0.5)
    tensors, header, _ = lycoris_export.lycoris_state_dict(model, "o")
    strength = json.loads(header["diffadapt.lycoris-export"])["conventions"]["strength"]
    assert "Cayley(s S)" in strength["diffadapt"] and "s^2 (R^T W - W)" in strength["comfyui"]
    assert "W + s (P W - W)" in strength["a1111"] and "W + s (R^T W - W)" in strength["lycoris, kohya (lycoris.kohya)"]
    g = {"oft_blocks": tensors["lycoris_0.oft_blocks"], "alpha": tensors["lycoris_0.alpha"]}
    w = layer.weight.detach().double()
    full = a1111_apply(w, g) - w
    torch.testing.assert_close(a1111_apply(w, g, 0.5), w + 0.5 * full)
    torch.testing.assert_close(comfy_apply(w, g, 0.5), w + 0.25 * full)
    da.set_adapters(model, "o", 0.5)
    da.merge_adapters(model)
    ours = model.get_submodule("0").base_layer.weight.double()
    assert rel(ours, w + 0.5 * full) > 1e-4 and rel(ours, w + 0.25 * full) > 1e-4


def test_sdxl_export_metadata_and_text_projection(tmp_path):
    """Items 12, 13: kohya's ss_* fields (A1111 files an SDXL LoRA under SDXL only by
    ss_base_model_version 'sdxl_*'), SD1's 'sd_v1'; text_encoder_2.text_projection is
    lora_te2_text_projection (as ComfyUI and LyCORIS map it), and both spellings read back."""
    pipe = tp.build_sdxl(0)
    config = da.OFTConfig(oft_block_size=4, rotation_side="output")
    da.add_adapter(pipe.unet, config, "x", preset="attention")
    da.add_adapter(pipe.text_encoder_2, copy.deepcopy(config).__class__(oft_block_size=4, rotation_side="output",
                   target_modules=["text_projection", "q_proj"]), "x")
    randomise(pipe, "x")
    path = tmp_path / "sdxl.safetensors"
    report = save_lycoris(pipe, path, "x")
    header = safe_header(path)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_v2"] == "False"
    assert header["ss_network_module"] == "lycoris.kohya" and header["ss_network_dim"] == "4"
    assert float(header["ss_network_alpha"]) > 0 and json.loads(header["ss_network_args"])["algo"] == "diag-oft"
    assert str(header["ss_base_model_version"]).startswith("sdxl_")  # A1111's detect_version: SdVersion.SDXL
    keys = load_file(str(path))
    assert "lora_te2_text_projection.oft_blocks" in keys
    assert not any("text_model_text_projection" in k for k in keys)
    assert "text_projection" in report["consumers"]["a1111"]  # OpenCLIP's is a parameter in A1111
    old = tmp_path / "old.safetensors"
    rename(path, old, lambda k: k.replace("lora_te2_text_projection", "lora_te2_text_model_text_projection"))
    for file in (path, old):
        again = fresh(tp.build_sdxl(0))
        da.load_adapter(again, file, "x")
        ours = da.adapter_parameters(pipe.text_encoder_2, "x")
        theirs = da.adapter_parameters(again.text_encoder_2, "x")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    sd = tp.build_sd(0)
    add(sd, config, "y")
    tensors_, sd_header, _ = lycoris_export.lycoris_state_dict(sd, "y")
    assert sd_header["ss_base_model_version"] == "sd_v1" and sd_header["ss_v2"] == "False"


def test_comfyui_trainer_oft_file(sd, tmp_path):
    """Item 14: ComfyUI's own trainer writes diffusion_model.<ldm path>.oft_blocks, alpha the norm
    limit itself, zero diff_b beside them: read on a pipeline and on a bare UNet as ComfyUI applies
    it (its oracle vs diffadapt's merged weights); trained (nonzero) bias diffs are refused."""
    g = torch.Generator().manual_seed(7)
    ldm = names.ldm_unet_paths(sd.unet)
    tensors, expected = {}, {}
    for i, path in enumerate(["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                              "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                              "mid_block.attentions.0.proj_out"]):
        module = sd.unet.get_submodule(path)
        out = module.weight.shape[0]
        blocks = torch.randn(out // 4, 4, 4, generator=g) * 0.3  # ComfyUI: block size <= block count
        norm = float((blocks - blocks.mT).norm())
        alpha = norm / 2 if i == 0 else 2 * norm  # binds on the first layer only
        key = f"diffusion_model.{ldm[path]}"
        tensors[f"{key}.oft_blocks"], tensors[f"{key}.alpha"] = blocks, torch.tensor(alpha)
        tensors[f"{key}.diff_b"] = torch.zeros(out)
        w = module.weight.detach().double()
        expected[path] = comfy_apply(w, {"oft_blocks": blocks, "alpha": torch.tensor(alpha)})
    path_ = tmp_path / "comfy_trained.safetensors"
    save_file(tensors, str(path_))
    for target in ("pipeline", "unet"):
        pipe = fresh(sd)
        obj = pipe if target == "pipeline" else pipe.unet
        da.load_adapter(obj, path_, "c")
        da.merge_adapters(obj)
        for path, want in expected.items():
            assert rel(pipe.unet.get_submodule(path).base_layer.weight.double(), want) <= 1e-5, (target, path)
    tensors[next(k for k in tensors if k.endswith("diff_b"))] = torch.full((32,), 0.1)
    save_file(tensors, str(path_))
    with pytest.raises(CheckpointError, match=r"1 diff/diff_b tensors beside the oft_blocks are nonzero \(e\.g\. "
                                              r"diffusion_model\.input_blocks\.1\.1.*ComfyUI's trainer trains biases"):
        da.load_adapter(fresh(sd), path_, "c")
