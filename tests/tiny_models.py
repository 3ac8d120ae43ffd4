"""Tiny diffusers / transformers models built from config dicts (no hub, random weights)."""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, widths=(32, 64)):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
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
    ).eval()


def unet_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
    )


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
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
    ).eval()


def sd3_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
    )


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
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
    ).eval()


def tiny_clip(seed: int = 0, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
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
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def clip_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, 1000, (batch, 7), generator=g))


# -- more text-to-image denoisers and text encoders (tests/test_families.py) -------------------------
def _steps(batch: int) -> torch.Tensor:
    return torch.tensor([0.1, 0.7][:batch])


def tiny_sd35(seed: int = 0):
    """SD3.5-style: block 0 has the dual (second, self-only) attention ``attn2``, qk RMS norms."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def tiny_flux2(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True,
    ).eval()


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


def tiny_qwenimage(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
    ).eval()


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


def tiny_zimage(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=48, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 8, 8], axes_lens=[64, 32, 32],
    ).eval()


def zimage_inputs(seed: int = 1, batch: int = 2):
    """Lists per sample: latents (C, F, H, W) and caption features (L, cap_feat_dim)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(4, 1, 4, 4, generator=g) for _ in range(batch)],
        t=_steps(batch),
        cap_feats=[torch.randn(3, 16, generator=g) for _ in range(batch)],
    )


def tiny_sana(seed: int = 0):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=4, patch_size=1,
    ).eval()


def sana_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, 32, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
    )


def tiny_chroma(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()


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


def tiny_hidream(seed: int = 0):
    """One double- and one single-stream block, each with a 2-expert MoE feed-forward."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1],
    ).eval()


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


def tiny_lumina2(seed: int = 0):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32),
        cap_feat_dim=16,
    ).eval()


def lumina2_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 4, 4, generator=g),
        timestep=_steps(batch),
        encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
        encoder_attention_mask=torch.ones(batch, 3, dtype=torch.bool),
    )


TEXT_VOCAB = 100


def tiny_t5(seed: int = 0, gated: bool = True):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=TEXT_VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_qwen25vl(seed: int = 0):
    """Qwen2.5-VL (Qwen-Image's text encoder): a 2-layer language model and a 1-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=TEXT_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16, patch_size=2,
            spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_gemma2(seed: int = 0):
    """Gemma 2 (Sana's and Lumina 2's text encoder)."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=TEXT_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    )
    return Gemma2Model(config).eval()


def text_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(3, TEXT_VOCAB, (batch, 5), generator=g))
