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
