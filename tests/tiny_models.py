"""Tiny diffusers / transformers models built from config dicts (no hub, random weights), and
``randomise`` to give adapters on them non-trivial values.

One builder per model class. Each seeds the global torch RNG with ``seed`` and builds the class
from its default geometry here, updated with ``**config`` (any constructor argument); the
pipelines of tests/tiny_pipelines.py use the same builders with their own geometry.
"""

from __future__ import annotations

import torch
from torch import nn

import diffadapt as da


def _build(cls, seed: int, defaults: dict, config: dict):
    torch.manual_seed(seed)
    return cls(**{**defaults, **config}).eval()


def tiny_unet(seed: int = 0, widths=(32, 64), **config):
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, seed, dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * len(widths),
        up_block_types=("CrossAttnUpBlock2D",) * len(widths),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ), config)


def unet_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
    )


def tiny_sd3(seed: int = 0, **config):
    from diffusers import SD3Transformer2DModel

    return _build(SD3Transformer2DModel, seed, dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    ), config)


def sd3_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
    )


def tiny_flux(seed: int = 0, **config):
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, seed, dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ), config)


def tiny_pixart(seed: int = 0, **config):
    from diffusers import PixArtTransformer2DModel

    return _build(PixArtTransformer2DModel, seed, dict(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    ), config)


def tiny_clip(seed: int = 0, with_projection: bool = False, **config):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _build(lambda **c: cls(CLIPTextConfig(**c)), seed, dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ), config)


def clip_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, 1000, (batch, 7), generator=g))


# -- more text-to-image denoisers and text encoders (tests/test_families.py) -------------------------
def _steps(batch: int) -> torch.Tensor:
    return torch.tensor([0.1, 0.7][:batch])


def tiny_sd35(seed: int = 0, **config):
    """SD3.5-style: block 0 has the dual (second, self-only) attention ``attn2``, qk RMS norms."""
    return tiny_sd3(seed, **{"dual_attention_layers": (0,), "qk_norm": "rms_norm", **config})


def tiny_flux2(seed: int = 0, **config):
    from diffusers import Flux2Transformer2DModel

    return _build(Flux2Transformer2DModel, seed, dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True,
    ), config)


def flux2_inputs(seed: int = 1, batch: int = 2):
    """2x2 latent tokens, 3 text tokens; ids are (t, h, w, l) positions as the Flux2 pipeline makes them."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(2.0), torch.zeros(1), indexing="ij")
    txt = torch.arange(3.0)
    return dict(
        hidden_states=torch.randn(batch, 4, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, 32, generator=g),
        timestep=_steps(batch),
        img_ids=torch.stack(grid, -1).reshape(-1, 4),
        txt_ids=torch.stack([torch.zeros(3), torch.zeros(3), torch.zeros(3), txt], -1),
        guidance=torch.full((batch,), 3.5),
    )


def tiny_qwenimage(seed: int = 0, **config):
    from diffusers import QwenImageTransformer2DModel

    return _build(QwenImageTransformer2DModel, seed, dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
    ), config)


def qwenimage_inputs(seed: int = 1, batch: int = 2):
    """4 packed latent tokens (1 frame of 2x2 patches), 3 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, 32, generator=g),
        encoder_hidden_states_mask=torch.ones(batch, 3, dtype=torch.long),
        timestep=_steps(batch),
        img_shapes=[[(1, 2, 2)]] * batch,
    )


def tiny_zimage(seed: int = 0, **config):
    from diffusers import ZImageTransformer2DModel

    return _build(ZImageTransformer2DModel, seed, dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=48, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 8, 8], axes_lens=[64, 32, 32],
    ), config)


def zimage_inputs(seed: int = 1, batch: int = 2):
    """Lists per sample: latents (C, F, H, W) and caption features (L, cap_feat_dim)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(4, 1, 4, 4, generator=g) for _ in range(batch)],
        t=_steps(batch),
        cap_feats=[torch.randn(3, 16, generator=g) for _ in range(batch)],
    )


def tiny_sana(seed: int = 0, **config):
    from diffusers import SanaTransformer2DModel

    return _build(SanaTransformer2DModel, seed, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=4, patch_size=1,
    ), config)


def sana_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, 32, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
    )


def tiny_chroma(seed: int = 0, **config):
    from diffusers import ChromaTransformer2DModel

    return _build(ChromaTransformer2DModel, seed, dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    ), config)


def chroma_inputs(seed: int = 1, batch: int = 2):
    """2x2 latent tokens, 3 text tokens; ids are (t, h, w) positions as the Flux/Chroma pipelines make them."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(2.0), indexing="ij")
    return dict(
        hidden_states=torch.randn(batch, 4, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, 32, generator=g),
        timestep=_steps(batch),
        img_ids=torch.stack(grid, -1).reshape(-1, 3),
        txt_ids=torch.zeros(3, 3),
    )


def tiny_hidream(seed: int = 0, **config):
    """One double- and one single-stream block, each with a 2-expert MoE feed-forward."""
    from diffusers import HiDreamImageTransformer2DModel

    return _build(HiDreamImageTransformer2DModel, seed, dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1],
    ), config)


def hidream_inputs(seed: int = 1, batch: int = 2):
    """T5 states (B, L, 16), Llama states of 2 layers (2, B, L, 8), pooled CLIP embeddings (B, 16)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 4, 4, generator=g),
        timesteps=torch.tensor([10, 500][:batch]),
        encoder_hidden_states_t5=torch.randn(batch, 3, 16, generator=g),
        encoder_hidden_states_llama3=torch.randn(2, batch, 3, 8, generator=g),
        pooled_embeds=torch.randn(batch, 16, generator=g),
    )


def tiny_lumina2(seed: int = 0, **config):
    from diffusers import Lumina2Transformer2DModel

    return _build(Lumina2Transformer2DModel, seed, dict(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32),
        cap_feat_dim=16,
    ), config)


def lumina2_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 4, 4, generator=g),
        timestep=_steps(batch),
        encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
        encoder_attention_mask=torch.ones(batch, 3, dtype=torch.bool),
    )


def tiny_wan(seed: int = 0, **config):
    """Wan 2.1 text-to-video; ``image_dim`` / ``added_kv_proj_dim`` give the image-to-video variant
    (an image embedder in ``condition_embedder`` and ``add_k_proj`` / ``add_v_proj`` in each ``attn2``)."""
    from diffusers import WanTransformer3DModel

    return _build(WanTransformer3DModel, seed, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=24, num_layers=2, rope_max_seq_len=32,
    ), config)


def tiny_wan_i2v(seed: int = 0, **config):
    """(``added_kv_proj_dim`` is the width of the embedded image tokens: the model's own.)"""
    return tiny_wan(seed, **{"image_dim": 12, "added_kv_proj_dim": 16, **config})


def wan_inputs(seed: int = 1, batch: int = 2, image_tokens: int = 0):
    """2 latent frames of 4x4 (2x2 patches: 8 tokens), 3 text tokens; with ``image_tokens`` CLIP
    image tokens (I2V) the text is 512 tokens (the I2V attention splits them off at 512 from the end)."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 2, 4, 4, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 512 if image_tokens else 3, 16, generator=g),
    )
    if image_tokens:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, image_tokens, 12, generator=g)
    return inputs


def wan_i2v_inputs(seed: int = 1, batch: int = 2):
    return wan_inputs(seed, batch, image_tokens=5)


TEXT_VOCAB = 100


def _t5_geometry(gated: bool) -> dict:
    return dict(
        vocab_size=TEXT_VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0,
    )


def tiny_t5(seed: int = 0, gated: bool = True, **config):
    from transformers import T5Config, T5EncoderModel

    return _build(lambda **c: T5EncoderModel(T5Config(**c)), seed, _t5_geometry(gated), config)


def tiny_umt5(seed: int = 0, **config):
    """UMT5 (Wan's text encoder): T5's geometry, a relative attention bias in every layer."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _build(lambda **c: UMT5EncoderModel(UMT5Config(**c)), seed, _t5_geometry(True), config)


def tiny_qwen25vl(seed: int = 0, **text_config):
    """Qwen2.5-VL (Qwen-Image's text encoder): a 2-layer language model and a 1-block vision tower;
    ``text_config`` updates the language model's config."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=TEXT_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    text.update(text_config)
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=text["hidden_size"], patch_size=2,
        spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0],
    )
    return _build(lambda **c: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**c)), seed,
                  dict(text_config=text, vision_config=vision), {})


def tiny_gemma2(seed: int = 0, **config):
    """Gemma 2 (Sana's and Lumina 2's text encoder)."""
    from transformers import Gemma2Config, Gemma2Model

    return _build(lambda **c: Gemma2Model(Gemma2Config(**c)), seed, dict(
        vocab_size=TEXT_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    ), config)


def text_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(3, TEXT_VOCAB, (batch, 5), generator=g))


# -- adapters with non-trivial values ---------------------------------------------------------------
SCALE_LIKE = ("boft_s", "frod_lambda_l")  # parameters that scale something: multiplied, not shifted


def randomise(obj, adapter_name: str, seed: int = 0, scale: float = 0.2) -> None:
    """Give adapter ``adapter_name`` of a model, or of every adapted component of a pipeline (in
    component order, one generator), reproducible non-trivial values: noise of std ``scale`` added
    to each parameter, or a factor ``1 + noise`` for the scale-like ones (``SCALE_LIKE``)."""
    g = torch.Generator().manual_seed(seed)
    modules = [obj] if isinstance(obj, nn.Module) else da.pipeline.adapted(obj).values()
    with torch.no_grad():
        for module in modules:
            for key, p in da.adapter_parameters(module, adapter_name).items():
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale
                p.mul_(1 + noise) if key.endswith(SCALE_LIKE) else p.add_(noise)
