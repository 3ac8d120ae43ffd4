"""Presets derived from structure (diffadapt.presets) on the text-to-image model families.

* on the five classes that had hand-written presets the derivation picks exactly the layers the
  old regexes picked (tiny configs, and the real configs built on the meta device);
* on SD3.5, Flux.2, Qwen-Image, Z-Image, Sana, Chroma, HiDream, Lumina 2, Wan (video; text- and
  image-to-video) and the T5 / UMT5 / Qwen2.5-VL / Gemma 2 text encoders, the preset layers equal
  an independent listing written here by class and child names;
* on each denoiser, an OFT + FourierFT pair on the presets saves, loads into a fresh model with
  the same outputs, merges to the live function and unmerges bit for bit.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import diffadapt as da
from diffadapt import patterns
from diffadapt.presets import preset_layers, preset_pattern
from tests import tiny_models as tm
from tests import tiny_pipelines as tp

PRESET_NAMES = ("attention", "attention+ff")

# The hand-written presets as they were before the derivation (frozen copy: "today's results").
_QKVO = r"(to_q|to_k|to_v|to_out\.0)"
_JOINT = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FF = r"ff\.net\.(0\.proj|2)"
_CLIP = r"(text_model\.)?encoder\.layers\.\d+\."
_UNET = {
    "attention": rf".*transformer_blocks\.\d+\.attn[12]\.{_QKVO}",
    "attention+ff": rf".*transformer_blocks\.\d+\.(attn[12]\.{_QKVO}|{_FF})",
}
_SD3 = {
    "attention": rf"transformer_blocks\.\d+\.attn\.{_JOINT}",
    "attention+ff": rf"transformer_blocks\.\d+\.(attn\.{_JOINT}|ff(_context)?\.net\.(0\.proj|2))",
}
LEGACY = {
    "UNet2DConditionModel": _UNET,
    "ControlNetModel": _UNET,
    "SD3Transformer2DModel": _SD3,
    "SD3ControlNetModel": _SD3,  # what train_scripts used for it (its PRESET_TWINS)
    "FluxTransformer2DModel": {
        "attention": rf"(transformer_blocks\.\d+\.attn\.{_JOINT}|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))",
        "attention+ff": (
            rf"(transformer_blocks\.\d+\.(attn\.{_JOINT}|ff(_context)?\.net\.(0\.proj|2))"
            r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))"
        ),
    },
    "PixArtTransformer2DModel": {
        "attention": rf"transformer_blocks\.\d+\.attn[12]\.{_QKVO}",
        "attention+ff": rf"transformer_blocks\.\d+\.(attn[12]\.{_QKVO}|{_FF})",
    },
    "CLIPTextModel": {
        "attention": rf"{_CLIP}self_attn\.(q_proj|k_proj|v_proj|out_proj)",
        "attention+ff": rf"{_CLIP}(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
    },
}
LEGACY["CLIPTextModelWithProjection"] = LEGACY["CLIPTextModel"]


def matching(model: nn.Module, regex: str) -> list[str]:
    return [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]


def tiny_sd3_controlnet():
    from diffusers import SD3ControlNetModel

    torch.manual_seed(0)
    return SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


LEGACY_TINY = {
    "sd15": tm.tiny_unet,
    "sdxl": tp.tiny_sdxl_unet,
    "controlnet": lambda: tp.tiny_controlnet(tp.tiny_sd_unet()),
    "sd3": tm.tiny_sd3,
    "sd3_controlnet": tiny_sd3_controlnet,
    "flux": tm.tiny_flux,
    "pixart": tm.tiny_pixart,
    "clip": tm.tiny_clip,
    "clip_projection": lambda: tm.tiny_clip(with_projection=True),
}


@pytest.mark.parametrize("family", list(LEGACY_TINY))
def test_derived_presets_pick_what_the_hand_written_ones_did(family):
    model = LEGACY_TINY[family]()
    legacy = LEGACY[type(model).__name__]
    for preset in PRESET_NAMES:
        old = matching(model, legacy[preset])
        assert old, (family, preset)
        assert matching(model, preset_pattern(model, preset)) == old, (family, preset)
        assert preset_layers(model)[preset] == old
    expected = matching(model, legacy["attention+ff"])
    assert da.add_adapter(model, da.HRAConfig(r=2), "a", preset="attention+ff") == expected


# real configs (from the hub's config.json files; sizes do not matter for names), built on meta
_SDXL = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, sample_size=128,
)
_SD3_MEDIUM = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=192)
REAL = {  # name: (class, config, attention count, attention+ff count)
    "sd15": ("UNet2DConditionModel", dict(cross_attention_dim=768), 128, 160),
    "sdxl": ("UNet2DConditionModel", _SDXL, 560, 700),
    "sd3_medium": ("SD3Transformer2DModel", _SD3_MEDIUM, 191, 285),
    "flux1": ("FluxTransformer2DModel", dict(guidance_embeds=True), 266, 418),
    "pixart": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
        cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        use_additional_conditions=False), 224, 280),
    # SD3.5 medium: blocks 0-12 carry a second (self-only) attention attn2: 13 x 4 more projections
    "sd35_medium": ("SD3Transformer2DModel", dict(_SD3_MEDIUM, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), 191 + 52, 285 + 52),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_on_meta(name):
    import diffusers

    cls, config, n_attention, n_both = REAL[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    got = {p: matching(model, preset_pattern(model, p)) for p in PRESET_NAMES}
    assert (len(got["attention"]), len(got["attention+ff"])) == (n_attention, n_both)
    old = {p: matching(model, LEGACY[cls][p]) for p in PRESET_NAMES}
    if name == "sd35_medium":
        for preset in PRESET_NAMES:
            extra = set(got[preset]) - set(old[preset])
            assert set(old[preset]) <= set(got[preset]) and len(extra) == 52
            assert {re.sub(r"\.\d+\.", ".N.", n, count=1) for n in extra} == {
                f"transformer_blocks.N.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")
            }
    else:
        assert got == old


def test_real_clip_text_encoders_on_meta():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig())  # 12 layers
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280))
    for model, layers in [(clip_l, 12), (clip_g, 32)]:
        for preset, per_layer in [("attention", 4), ("attention+ff", 6)]:
            got = matching(model, preset_pattern(model, preset))
            assert len(got) == layers * per_layer and got == matching(model, LEGACY["CLIPTextModel"][preset])


# -- new families: an independent listing by class and child names ---------------------------------
_DIFFUSERS_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ATTENTION_CHILDREN = {  # attention class -> its projection children
    "Attention": _DIFFUSERS_ATTN,
    "FluxAttention": _DIFFUSERS_ATTN,
    "Flux2Attention": _DIFFUSERS_ATTN,
    "Flux2ParallelSelfAttention": ["to_qkv_mlp_proj", "to_out"],  # fused attention + MLP in / out
    "HiDreamAttention": ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"],
    "WanAttention": _DIFFUSERS_ATTN,  # I2V: attn2's add_k_proj / add_v_proj read the image tokens
    "T5Attention": ["q", "k", "v", "o"],
    "UMT5Attention": ["q", "k", "v", "o"],
    "Qwen2_5_VLAttention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "Gemma2Attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
FF_CHILDREN = {  # feed-forward class (or block with MLP Linears) -> its layers
    "FeedForward": ["net.0.proj", "net.2", "w1", "w2", "w3"],  # diffusers' and Z-Image's own class
    "Flux2FeedForward": ["linear_in", "linear_out"],
    "LuminaFeedForward": ["linear_1", "linear_2", "linear_3"],
    "HiDreamImageFeedForwardSwiGLU": ["w1", "w2", "w3"],  # shared and routed experts
    "GLUMBConv": ["conv_inverted", "conv_point"],  # conv_depth is depthwise: spatial, not a projection
    "FluxSingleTransformerBlock": ["proj_mlp", "proj_out"],
    "ChromaSingleTransformerBlock": ["proj_mlp", "proj_out"],
    "T5DenseGatedActDense": ["wi_0", "wi_1", "wo"],
    "UMT5DenseGatedActDense": ["wi_0", "wi_1", "wo"],
    "Qwen2MLP": ["gate_proj", "up_proj", "down_proj"],
    "Gemma2MLP": ["gate_proj", "up_proj", "down_proj"],
}
# family: (builder, inputs, attention count, attention+ff count), counts of these tiny configs
FAMILIES = {
    "sd35": (tm.tiny_sd35, tm.sd3_inputs, 19, 25),
    "flux2": (tm.tiny_flux2, tm.flux2_inputs, 10, 14),
    "qwenimage": (tm.tiny_qwenimage, tm.qwenimage_inputs, 16, 24),
    "zimage": (tm.tiny_zimage, tm.zimage_inputs, 16, 28),
    "sana": (tm.tiny_sana, tm.sana_inputs, 16, 20),
    "chroma": (tm.tiny_chroma, tm.chroma_inputs, 11, 17),
    "hidream": (tm.tiny_hidream, tm.hidream_inputs, 12, 33),
    "lumina2": (tm.tiny_lumina2, tm.lumina2_inputs, 16, 28),
    "wan": (tm.tiny_wan, tm.wan_inputs, 16, 20),  # video; 2 blocks of attn1 + attn2 (4 each) + ffn (2)
}
TEXT_ENCODERS = {
    "t5": (tm.tiny_t5, tm.text_inputs, 8, 14),
    "qwen25vl": (tm.tiny_qwen25vl, tm.text_inputs, 8, 14),
    "gemma2": (tm.tiny_gemma2, tm.text_inputs, 8, 14),
    "umt5": (tm.tiny_umt5, tm.text_inputs, 8, 14),  # Wan's
}


def listed(model: nn.Module, table: dict[str, list[str]]) -> list[str]:
    out = []
    for name, module in model.named_modules():
        for child in table.get(type(module).__name__, []):
            try:
                layer = module.get_submodule(child)
            except AttributeError:
                continue
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                out.append(f"{name}.{child}" if name else child)
    return out


@pytest.mark.parametrize("family", [*FAMILIES, *TEXT_ENCODERS])
def test_preset_layers_equal_an_independent_listing(family):
    build, _, n_attention, n_both = {**FAMILIES, **TEXT_ENCODERS}[family]
    model = build()
    attention = listed(model, ATTENTION_CHILDREN)
    both = attention + listed(model, FF_CHILDREN)
    got = {p: matching(model, preset_pattern(model, p)) for p in PRESET_NAMES}
    assert sorted(got["attention"]) == sorted(attention) and len(attention) == n_attention
    assert sorted(got["attention+ff"]) == sorted(both) and len(both) == n_both
    assert not any(n.startswith(("model.visual", "lm_head")) for n in got["attention+ff"])  # Qwen2.5-VL
    for preset in PRESET_NAMES:  # the regex matches as re does under the bounded matcher (as files' do)
        regex = preset_pattern(model, preset)
        assert len(regex) <= patterns.MAX_PATTERN_CHARS
        assert [n for n, _ in model.named_modules() if patterns.fullmatch(regex, n, "t")] == got[preset]


def test_wan_image_to_video_presets_leave_the_image_embedder_out(tmp_path):
    """Wan I2V: the condition embedder's image embedder is a FeedForward outside the blocks (never
    chosen); each attn2 gains add_k_proj / add_v_proj (attention projections of the image tokens)."""
    model = tm.tiny_wan_i2v()
    attention = listed(model, ATTENTION_CHILDREN)
    ff = listed(model, FF_CHILDREN)
    embedder = [n for n in ff if n.startswith("condition_embedder.")]
    assert embedder == ["condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2"]
    assert sum(n.endswith(("add_k_proj", "add_v_proj")) for n in attention) == 4
    got = {p: matching(model, preset_pattern(model, p)) for p in PRESET_NAMES}
    assert got["attention"] == attention and len(attention) == 20
    assert got["attention+ff"] == sorted(attention + [n for n in ff if n not in embedder], key=model_order(model))
    assert len(got["attention+ff"]) == 24
    inputs, other = tm.wan_i2v_inputs(), tm.wan_i2v_inputs(seed=2)
    other = {**inputs, "encoder_hidden_states_image": other["encoder_hidden_states_image"]}
    assert not torch.equal(output(model, inputs), output(model, other))  # the image tokens count
    roundtrip(tm.tiny_wan_i2v, tm.wan_i2v_inputs, tmp_path, PLAN)


@pytest.mark.parametrize("variant", ["t2v_14b", "i2v_14b"])
def test_real_wan_configs_on_meta(variant):
    """Wan 2.1 14B (the hub configs' geometry): 40 blocks of attn1 (4) + attn2 (4; I2V: 6) + ffn (2)."""
    from diffusers import WanTransformer3DModel

    i2v = variant == "i2v_14b"
    extra = dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=None) if i2v else {}
    with torch.device("meta"):
        model = WanTransformer3DModel(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                                      **extra)
    per_block = 10 if i2v else 8
    got = {p: matching(model, preset_pattern(model, p)) for p in PRESET_NAMES}
    assert (len(got["attention"]), len(got["attention+ff"])) == (40 * per_block, 40 * (per_block + 2))
    assert all(n.startswith("blocks.") for n in got["attention+ff"])


def model_order(model: nn.Module):
    return {n: i for i, (n, _) in enumerate(model.named_modules())}.__getitem__


def test_preset_of_an_adapted_model_and_aliases():
    """A second adapter's preset is read through the first one's hosts: the same layers."""
    model = tm.tiny_hidream()
    first = da.add_adapter(model, da.HRAConfig(r=2), "a", preset="attention+ff")
    assert da.add_adapter(model, da.FourierFTConfig(n_frequency=10), "b", preset="attn+ff") == first
    assert matching(model, preset_pattern(model, "attention")) == preset_layers(tm.tiny_hidream())["attention"]


def test_model_without_attention_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    with pytest.raises(da.AdapterConfigError, match="No target presets for Sequential: it has no attention modules.*"
                                                     "Pass target_modules"):
        da.add_adapter(model, da.HRAConfig(r=2), "a", preset="attention+ff")
    with pytest.raises(da.AdapterConfigError, match="Unknown preset 'attentoin' for SanaTransformer2DModel"):
        da.add_adapter(tm.tiny_sana(), da.HRAConfig(r=2), "a", preset="attentoin")


# -- each denoiser: add, save, load into a fresh model, merge, unmerge -----------------------------
def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, tuple):
        out = out[0]
    for field in ("sample", "last_hidden_state", "logits"):
        if hasattr(out, field):
            out = getattr(out, field)
            break
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image returns one tensor per sample


def randomise(model: nn.Module, names, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in da.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def roundtrip(build, inputs, tmp_path, plan) -> None:
    model, x = build(), inputs()
    base = output(model, x)
    for name, (config, preset) in plan.items():
        da.add_adapter(model, config, name, preset=preset)
    randomise(model, plan)
    da.set_adapters(model, list(plan))
    live = output(model, x)
    assert ((live - base).norm() / base.norm()) > 1e-3  # the adapters do something
    fresh = build()
    for name in plan:
        da.load_adapter(fresh, da.save_adapter(model, tmp_path / name, name), name)
    da.set_adapters(fresh, list(plan))
    assert torch.equal(output(fresh, x), live)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    da.merge_adapters(model)
    torch.testing.assert_close(output(model, x), live, rtol=1e-4, atol=1e-5)
    da.unmerge_adapters(model)
    now = model.state_dict()
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())
    torch.testing.assert_close(output(model, x), live, rtol=1e-4, atol=1e-5)


PLAN = {  # a rotation on everything the larger preset picks, FourierFT on the attention only
    "oft": (da.OFTConfig(oft_block_size=4, r=0), "attention+ff"),
    "fft": (da.FourierFTConfig(n_frequency=20), "attention"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_denoiser_save_load_merge_unmerge(family, tmp_path):
    build, inputs, _, _ = FAMILIES[family]
    roundtrip(build, inputs, tmp_path, PLAN)


@pytest.mark.parametrize("family", list(TEXT_ENCODERS))
def test_text_encoder_save_load_merge_unmerge(family, tmp_path):
    build, inputs, _, _ = TEXT_ENCODERS[family]
    if family == "t5":  # T5's feed-forward reads self.wo.weight, which an AdapterHost does not expose
        plan = {"oft": (PLAN["oft"][0], "attention"), "fft": PLAN["fft"]}
    else:
        plan = PLAN
    roundtrip(build, inputs, tmp_path, plan)


def test_t5_feed_forward_adapted(tmp_path):
    """T5's feed-forward reads ``self.wo.weight`` (a dtype check): the host forwards ``weight``."""
    model = tm.tiny_t5()
    base = output(model, tm.text_inputs())
    da.add_adapter(model, da.OFTConfig(oft_block_size=4, r=0), "oft", preset="attention+ff")
    host = model.get_submodule(next(n for n, _ in da.model.hosts(model) if n.endswith("wo")))
    assert host.weight is host.base_layer.weight
    torch.testing.assert_close(output(model, tm.text_inputs()), base)  # identity init


@pytest.mark.parametrize("family", ["hidream", "sana", "qwen25vl"])
def test_peft_reads_the_same_layers_from_the_stored_regex(family):
    """The preset's regex is what a saved adapter_config.json carries as target_modules."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    build = {**FAMILIES, **TEXT_ENCODERS}[family][0]
    model = build()
    for preset in PRESET_NAMES:
        expected = preset_layers(model)[preset]
        adapted = inject_adapter_in_model(LoraConfig(r=2, target_modules=preset_pattern(model, preset)), build())
        assert [n for n, m in adapted.named_modules() if isinstance(m, LoraLayer)] == expected


def test_ip_adapter_processor_layers_are_not_attention_projections():
    """IP-Adapter processors are modules inside the attention (``attn2.processor.to_k_ip.0``):
    they belong to the IP-Adapter, not to the model's attention, and the presets leave them out."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    model = tm.tiny_unet()
    processors = {}
    for name in model.attn_processors:
        attention = model.get_submodule(name.rsplit(".processor", 1)[0])
        processors[name] = (
            IPAdapterAttnProcessor2_0(attention.to_q.out_features, cross_attention_dim=32, num_tokens=(4,))
            if "attn2" in name else AttnProcessor2_0()
        )
    model.set_attn_processor(processors)
    assert any(n.endswith("processor.to_k_ip.0") for n, _ in model.named_modules())
    for preset in PRESET_NAMES:
        assert matching(model, preset_pattern(model, preset)) == matching(model, LEGACY["UNet2DConditionModel"][preset])
