"""Tiny, fully offline diffusers pipelines with random weights, built from config dicts.

Every ``build_<family>(seed=0)`` returns a complete diffusers pipeline whose components are all
tiny (14k-1M parameters each; progress bars off) and whose tokenizers are built locally —
nothing touches a model hub.  Like tests/tiny_models.py, builders seed the global torch RNG.  The pipelines are meant for the pipeline-loader test-suite: build one, call
it, ``save_pretrained`` it to a folder, load the folder back with ``<Pipeline>.from_pretrained``.

Common geometry (all families):

* VAE: 4 blocks, ``vae_scale_factor`` 8 (like the real models); ``DEFAULT_SIZE`` = 64 px gives
  8x8 latents.  32 px (4x4 latents) also works for every family.
* Denoisers have ``sample_size`` 8, so the pipelines' own default height/width is 64 px too.
* Models: the builders of tests/tiny_models.py, with the geometry these pipelines need.
* CLIP tokenizers: byte-level BPE, no merges, ``model_max_length`` 77 (diffadapt.embedded.tokenizer with
  no words; docs/design.md, "Working offline"). Token ids: 256 bytes, 256 bytes+``</w>``, ``<|startoftext|>`` = 512, ``<|endoftext|>`` = 513.
* T5 tokenizers: a small Unigram vocabulary (lower/upper-case letters, digits, punctuation and a
  few whole words), ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, built with ``tokenizers`` and
  loaded through ``T5TokenizerFast.from_pretrained(<tmp dir>)``.  T5 pipelines must be called with
  a small ``max_sequence_length`` (``T5_MAX_LEN`` = 16); ``generate`` does that.

Use ``generate(pipe, ...)`` to get latents (``output_type="latent"``) with the extra kwargs each
family needs (``pipeline_kwargs`` shows them), and ``save_and_reload(pipe, dir)`` for the real
local-folder loading path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import tempfile

import torch

from diffadapt.embedded.tokenizer import _byte_symbols, build_tokenizer
from tests import tiny_models as tm

DEFAULT_SIZE = 64  # pixels; VAE scale factor 8 -> 8x8 latents
T5_MAX_LEN = 16  # max_sequence_length passed to every T5-using pipeline
CLIP_MAX_LEN = 77
LM_MAX_LEN = 64  # max_sequence_length for the language-model text encoders (chat template included)

_VAE_SCALE_FACTOR = 8
_SAMPLE_SIZE = DEFAULT_SIZE // _VAE_SCALE_FACTOR  # latent side length the denoisers default to


# --------------------------------------------------------------------------------------------
# tokenizers (offline)
# --------------------------------------------------------------------------------------------


def tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LEN):
    """Byte-level CLIPTokenizer with no merges (every byte is one token), 514 ids."""
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        return build_tokenizer(tmp, words=(), model_max_length=model_max_length)


CLIP_VOCAB_SIZE = 514
CLIP_BOS_ID, CLIP_EOS_ID = 512, 513


_T5_WORDS = (
    "a an the of on in and with red green blue yellow black white circle square triangle "
    "cat dog photo painting of portrait landscape"
).split()


def _t5_pieces() -> list[tuple[str, float]]:
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece, score):
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in _T5_WORDS:
        add("▁" + w, -5.0)
    for c in string.ascii_letters + string.digits:
        add("▁" + c, -9.0)
    for c in string.ascii_letters + string.digits + string.punctuation:
        add(c, -10.0)
    return pieces


def tiny_t5_tokenizer(model_max_length: int = 512):
    """Unigram T5 tokenizer (``T5TokenizerFast``) built with ``tokenizers``; pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    tk = Tokenizer(Unigram(_t5_pieces(), unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tmp = tempfile.mkdtemp(prefix="tiny_t5_tok_")
    try:
        tk.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "model_max_length": model_max_length,
                    "pad_token": "<pad>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "extra_ids": 0,
                    "additional_special_tokens": [],
                },
                f,
            )
        tok = T5TokenizerFast.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


T5_VOCAB_SIZE = len(_t5_pieces())


# --------------------------------------------------------------------------------------------
# text encoders
# --------------------------------------------------------------------------------------------


def tiny_clip_text_encoder(
    seed: int = 0, hidden: int = 32, projection_dim: int = 32, with_projection: bool = False,
    max_positions: int = CLIP_MAX_LEN,
):
    """``tm.tiny_clip`` matching ``tiny_clip_tokenizer`` (eos id 513: the pooled output is taken at
    the first <|endoftext|>)."""
    return tm.tiny_clip(
        seed, with_projection, vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=max(hidden // 8, 1), max_position_embeddings=max_positions, projection_dim=projection_dim,
        bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID,
    )


def tiny_t5_encoder(seed: int = 0, d_model: int = 32, umt5: bool = False):
    """``tm.tiny_t5`` (``umt5=True``: ``tm.tiny_umt5``) matching ``tiny_t5_tokenizer``: one layer."""
    return (tm.tiny_umt5 if umt5 else tm.tiny_t5)(
        seed, vocab_size=T5_VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_decoder_layers=0,
        num_heads=max(d_model // 8, 1), relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
    )


# --------------------------------------------------------------------------------------------
# VAE / denoisers
# --------------------------------------------------------------------------------------------


def tiny_vae(seed: int = 0, latent_channels: int = 4, flow: bool = False):
    """AutoencoderKL with 4 blocks (scale factor 8).

    ``flow=True`` gives the SD3/Flux layout: no quant convs, a ``shift_factor`` (the SD3/Flux
    pipelines compute ``latents / scaling_factor + shift_factor``, so it must not be None).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {}
    if flow:
        extra = dict(
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=DEFAULT_SIZE,
        **extra,
    ).eval()


def tiny_sd_unet(seed: int = 0):
    """SD1.x-like UNet: conv ``proj_in``/``proj_out`` (use_linear_projection=False), cross-attn 32."""
    return tm.tiny_unet(
        seed, sample_size=_SAMPLE_SIZE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


# SDXL geometry: te1 CLIPTextModel hidden 32, te2 CLIPTextModelWithProjection hidden 32 / proj 32.
_SDXL_TIME_DIM = 8
_SDXL_TE2_PROJ = 32


def tiny_sdxl_unet(seed: int = 0):
    """SDXL-like UNet: linear proj_in/out, ``text_time`` added conditioning."""
    return tm.tiny_unet(
        seed,
        sample_size=_SAMPLE_SIZE,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=64,  # te1 hidden (32) + te2 hidden (32)
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_DIM,
        # 6 time ids (original size, crop coords, target size) + te2 pooled projection
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_DIM + _SDXL_TE2_PROJ,
    )


# 16-channel latents (SD3 / Flux VAEs); joint dim 32 = T5 d_model; pooled 32 = two CLIP projections of 16
_SD3_GEOMETRY = dict(sample_size=_SAMPLE_SIZE, in_channels=16, out_channels=16, pooled_projection_dim=32)


def tiny_sd3_transformer(seed: int = 0):
    """``tm.tiny_sd3`` for 16-channel latents; the last block is context_pre_only (no to_add_out / ff_context)."""
    return tm.tiny_sd3(seed, **_SD3_GEOMETRY)


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    """``tm.tiny_flux`` for 16-channel latents packed 2x2 (in_channels 64); joint dim = T5 d_model,
    pooled dim = CLIP hidden (pooler_output)."""
    return tm.tiny_flux(
        seed, in_channels=64, attention_head_dim=16, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def tiny_controlnet(unet, seed: int = 0):
    """ControlNetModel.from_unet with small conditioning embedding (downsamples 8x, like the VAE).

    ``from_unet`` leaves the ``controlnet_*`` output convs and the conditioning embedding's
    ``conv_out`` zero-initialised, which would make the ControlNet a no-op; they (and the rest of
    the conditioning embedding) are re-initialised from ``seed`` so that both the ControlNet and
    the control image really change the output.
    """
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # He-normal init, zero bias, for the conditioning embedding: with PyTorch's default init
        # the image signal fades through its 8 convs and every control image gives ~ the same
        # output (differences ~1e-4).
        for conv in cn.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
        for conv in [cn.controlnet_mid_block, *cn.controlnet_down_blocks]:  # zero 1x1 convs
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * fan_in**-0.5)
            conv.bias.zero_()
    return cn.eval()


# --------------------------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------------------------


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _flow_match(dynamic: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:  # Flux
        return FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=4096,
            max_shift=1.15,
            shift=3.0,
            use_dynamic_shifting=True,
        )
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3


def _dpm():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


# --------------------------------------------------------------------------------------------
# pipeline builders
# --------------------------------------------------------------------------------------------


def _sd_components(seed: int) -> dict:
    return dict(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed + 1),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_sd_unet(seed + 2),
        scheduler=_ddim(),
    )


def _sdxl_components(seed: int) -> dict:
    return dict(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed + 1),
        text_encoder_2=tiny_clip_text_encoder(seed + 2, projection_dim=_SDXL_TE2_PROJ, with_projection=True),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=tiny_sdxl_unet(seed + 3),
        scheduler=_euler(),
    )


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd(seed: int = 0):
    """StableDiffusionPipeline (SD1.x layout), DDIM scheduler, no safety checker."""
    from diffusers import StableDiffusionPipeline

    return _quiet(StableDiffusionPipeline(
        **_sd_components(seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ))


def build_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection, Euler scheduler."""
    from diffusers import StableDiffusionXLPipeline

    # add_watermarker=False: the watermark would only touch "pil" output, but keep it off so
    # the result does not depend on whether invisible-watermark happens to be installed.
    return _quiet(StableDiffusionXLPipeline(**_sdxl_components(seed), add_watermarker=False))


def _sd3_components(seed: int, transformer, with_t5: bool = True) -> dict:
    return dict(
        transformer=transformer,
        vae=tiny_vae(seed + 1, latent_channels=16, flow=True),
        scheduler=_flow_match(),
        text_encoder=tiny_clip_text_encoder(seed + 2, hidden=16, projection_dim=16, with_projection=True),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed + 3, hidden=16, projection_dim=16, with_projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 4) if with_t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if with_t5 else None,
    )


def build_sd3(seed: int = 0, with_t5: bool = True):
    """StableDiffusion3Pipeline; ``with_t5=False`` leaves text_encoder_3/tokenizer_3 as None."""
    from diffusers import StableDiffusion3Pipeline

    return _quiet(StableDiffusion3Pipeline(**_sd3_components(seed, tiny_sd3_transformer(seed), with_t5)))


def build_flux(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline (dev-like guidance embedding by default; ``guidance_embeds=False`` ~ schnell)."""
    from diffusers import FluxPipeline

    return _quiet(FluxPipeline(
        transformer=tiny_flux_transformer(seed, guidance_embeds=guidance_embeds),
        vae=tiny_vae(seed + 1, latent_channels=16, flow=True),
        scheduler=_flow_match(dynamic=True),
        text_encoder=tiny_clip_text_encoder(seed + 2, hidden=32),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed + 3),
        tokenizer_2=tiny_t5_tokenizer(),
    ))


def _pixart_components(seed: int) -> dict:
    return dict(
        transformer=tm.tiny_pixart(seed, sample_size=_SAMPLE_SIZE),  # out 8: learned sigma
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_t5_encoder(seed + 2),
        tokenizer=tiny_t5_tokenizer(),
        scheduler=_dpm(),
    )


def build_pixart(seed: int = 0):
    """PixArtAlphaPipeline (DPM-Solver++ scheduler)."""
    from diffusers import PixArtAlphaPipeline

    return _quiet(PixArtAlphaPipeline(**_pixart_components(seed)))


def build_pixart_sigma(seed: int = 0):
    """PixArtSigmaPipeline (same tiny components as build_pixart)."""
    from diffusers import PixArtSigmaPipeline

    return _quiet(PixArtSigmaPipeline(**_pixart_components(seed)))


def build_sd_controlnet(seed: int = 0):
    """StableDiffusionControlNetPipeline; the ControlNet is derived from the pipeline's UNet."""
    from diffusers import StableDiffusionControlNetPipeline

    comps = _sd_components(seed)
    return _quiet(StableDiffusionControlNetPipeline(
        **comps,
        controlnet=tiny_controlnet(comps["unet"], seed + 10),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ))


def build_sdxl_controlnet(seed: int = 0):
    """StableDiffusionXLControlNetPipeline; the ControlNet is derived from the SDXL UNet."""
    from diffusers import StableDiffusionXLControlNetPipeline

    comps = _sdxl_components(seed)
    return _quiet(StableDiffusionXLControlNetPipeline(
        **comps, controlnet=tiny_controlnet(comps["unet"], seed + 10), add_watermarker=False
    ))


BUILDERS = {
    "sd": build_sd,
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
    "pixart": build_pixart,
    "pixart_sigma": build_pixart_sigma,
    "sd_controlnet": build_sd_controlnet,
    "sdxl_controlnet": build_sdxl_controlnet,
}


# --------------------------------------------------------------------------------------------
# newer families (SD3.5, Flux.2, Qwen-Image, Z-Image, Sana, Lumina 2, Chroma, HiDream)
# --------------------------------------------------------------------------------------------
#
# Their text encoders are language models (Mistral 3, Qwen2.5-VL, Qwen3, Gemma 2, Llama, T5);
# their tokenizers are one byte-level BPE with no merges (``tiny_byte_tokenizer``: every byte one
# token, plus a few special tokens and a chat template), wrapped in the class each pipeline uses.
# The denoisers are tests/tiny_models.py's, with the channels the VAEs need.

LM_VOCAB = 272  # >= len(tiny_byte_tokenizer()): 5 special tokens, 256 bytes, "▁"
BYTE_SPECIALS = ("<pad>", "</s>", "<s>", "<unk>", "<|endoftext|>")

# the content of a message is a string or (Flux.2, Qwen-Image) a list of {"type": "text", "text": ...}
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_byte_tokenizer(cls_name: str = "Qwen2Tokenizer", bos: bool = False, model_max_length: int = 4096):
    """A byte-level BPE tokenizer (no merges) saved as ``tokenizer.json`` and loaded as
    ``transformers.<cls_name>``: ids 0-4 are ``BYTE_SPECIALS`` (pad, eos, bos, unk, endoftext),
    then the 256 bytes, then ``▁`` (Gemma / Llama tokenizers turn spaces into it). ``bos=True``
    prepends ``<s>`` (Gemma, Llama). It carries a chat template, for the pipelines that apply one."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = {s: i for i, s in enumerate(BYTE_SPECIALS)}
    for s in _byte_symbols():
        vocab[s] = len(vocab)
    vocab.setdefault("\u2581", len(vocab))
    tk = Tokenizer(BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIALS])
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single=["<s>", "$A"], pair=["<s>", "$A", "<s>", "$B"], special_tokens=[("<s>", 2)]
        )
    config = dict(
        model_max_length=model_max_length, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        chat_template=_CHAT_TEMPLATE, tokenizer_class=cls_name,
    )
    if bos:
        config["bos_token"] = "<s>"
    tmp = tempfile.mkdtemp(prefix="tiny_byte_tok_")
    try:
        tk.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
        tok = getattr(transformers, cls_name).from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert len(tok) <= LM_VOCAB
    return tok


def _lm_text_config(hidden: int = 16, layers: int = 2, **extra) -> dict:
    return dict(
        vocab_size=LM_VOCAB, hidden_size=hidden, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=2048,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra,
    )


def tiny_mistral3_encoder(seed: int = 0, hidden: int = 16, layers: int = 30):
    """Mistral3ForConditionalGeneration (Flux.2's text encoder): ``layers`` >= 30 because the
    pipeline stacks hidden states 10, 20 and 30 by default; a 1-block Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", sliding_window=None, **_lm_text_config(hidden, layers)),
        vision_config=dict(
            model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
            image_size=30, patch_size=6, num_channels=3,
        ),
        image_token_index=4, image_seq_length=4, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_qwen3_encoder(seed: int = 0, hidden: int = 16):
    """Qwen3Model (Z-Image's text encoder)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(Qwen3Config(**_lm_text_config(hidden))).eval()


def tiny_llama_encoder(seed: int = 0, hidden: int = 8):
    """LlamaForCausalLM (HiDream's fourth text encoder); eager attention (the pipeline asks for attentions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**_lm_text_config(hidden))
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def tiny_flux2_vae(seed: int = 0, latent_channels: int = 4):
    """AutoencoderKLFlux2, 4 blocks (scale factor 8); latents are patchified 2x2 (4 x latent_channels)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=DEFAULT_SIZE,
    ).eval()


def tiny_qwenimage_vae(seed: int = 0, z_dim: int = 4):
    """AutoencoderKLQwenImage (a causal 3-D VAE): 3 stages, spatial scale factor 4."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    ).eval()


def tiny_dc_vae(seed: int = 0, latent_channels: int = 4):
    """AutoencoderDC (Sana's deep-compression VAE): 6 ResBlock stages, scale factor 32 like the real one."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=2,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8,) * 6, decoder_block_out_channels=(8,) * 6,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()


def build_sd35(seed: int = 0):
    """StableDiffusion3Pipeline with an SD3.5-style transformer: dual attention (``attn2``) in
    block 0 and RMS q/k norms; CLIP x2 + T5 as in build_sd3."""
    from diffusers import StableDiffusion3Pipeline

    return _quiet(StableDiffusion3Pipeline(**_sd3_components(seed, tm.tiny_sd35(seed, **_SD3_GEOMETRY))))


def build_flux2(seed: int = 0):
    """Flux2Pipeline: Flux2Transformer2DModel, a Mistral 3 text encoder (30 layers of width 16:
    the prompt embedding stacks layers 10/20/30, 48 wide), AutoencoderKLFlux2. The tokenizer is
    the byte tokenizer with a chat template (the real one is a Pixtral processor, which needs
    torchvision; the pipeline only calls ``apply_chat_template`` on it)."""
    from diffusers import Flux2Pipeline

    transformer = tm.tiny_flux2(seed, joint_attention_dim=48)
    return _quiet(Flux2Pipeline(
        scheduler=_flow_match(dynamic=True),
        vae=tiny_flux2_vae(seed + 1),
        text_encoder=tiny_mistral3_encoder(seed + 2),
        tokenizer=tiny_byte_tokenizer("PreTrainedTokenizerFast"),
        transformer=transformer,
    ))


def build_qwenimage(seed: int = 0):
    """QwenImagePipeline: QwenImageTransformer2DModel, Qwen2.5-VL, AutoencoderKLQwenImage (scale 4)."""
    from diffusers import QwenImagePipeline

    transformer = tm.tiny_qwenimage(seed, joint_attention_dim=16)
    return _quiet(QwenImagePipeline(
        scheduler=_flow_match(dynamic=True),
        vae=tiny_qwenimage_vae(seed + 1),
        text_encoder=tm.tiny_qwen25vl(seed + 2, **_lm_text_config(16)),
        tokenizer=tiny_byte_tokenizer("Qwen2Tokenizer"),
        transformer=transformer,
    ))


def build_zimage(seed: int = 0):
    """ZImagePipeline: ZImageTransformer2DModel, Qwen3, a 16-channel flow AutoencoderKL."""
    from diffusers import ZImagePipeline

    transformer = tm.tiny_zimage(seed, in_channels=16, axes_lens=[512, 32, 32])
    return _quiet(ZImagePipeline(
        scheduler=_flow_match(),
        vae=tiny_vae(seed + 1, latent_channels=16, flow=True),
        text_encoder=tiny_qwen3_encoder(seed + 2),
        tokenizer=tiny_byte_tokenizer("Qwen2Tokenizer"),
        transformer=transformer,
    ))


def build_sana(seed: int = 0):
    """SanaPipeline: SanaTransformer2DModel (``sample_size`` 16: resolution binning maps to the
    512 px bins), Gemma 2, AutoencoderDC (scale factor 32)."""
    from diffusers import SanaPipeline

    transformer = tm.tiny_sana(seed, caption_channels=16, sample_size=16)
    return _quiet(SanaPipeline(
        tokenizer=tiny_byte_tokenizer("GemmaTokenizer", bos=True),
        text_encoder=tm.tiny_gemma2(seed + 2, **_lm_text_config(16)),
        vae=tiny_dc_vae(seed + 1),
        transformer=transformer,
        scheduler=_flow_match(),
    ))


def build_lumina2(seed: int = 0):
    """Lumina2Pipeline: Lumina2Transformer2DModel, Gemma 2, a 4-block AutoencoderKL."""
    from diffusers import Lumina2Pipeline

    transformer = tm.tiny_lumina2(seed, sample_size=_SAMPLE_SIZE, in_channels=16, axes_lens=(512, 32, 32))
    return _quiet(Lumina2Pipeline(
        transformer=transformer,
        scheduler=_flow_match(),
        vae=tiny_vae(seed + 1, latent_channels=16, flow=True),
        text_encoder=tm.tiny_gemma2(seed + 2, **_lm_text_config(16)),
        tokenizer=tiny_byte_tokenizer("GemmaTokenizer", bos=True),
    ))


def build_chroma(seed: int = 0):
    """ChromaPipeline: ChromaTransformer2DModel (16-channel latents packed 2x2), T5."""
    from diffusers import ChromaPipeline

    transformer = tm.tiny_chroma(seed, in_channels=64, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    return _quiet(ChromaPipeline(
        scheduler=_flow_match(dynamic=True),
        vae=tiny_vae(seed + 1, latent_channels=16, flow=True),
        text_encoder=tiny_t5_encoder(seed + 2),
        tokenizer=tiny_t5_tokenizer(),
        transformer=transformer,
    ))


def _small_flow_vae(seed: int = 0):
    """A 2-block 16-channel flow AutoencoderKL (scale factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=16,
        norm_num_groups=8, sample_size=DEFAULT_SIZE, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def build_hidream(seed: int = 0):
    """HiDreamImagePipeline: HiDreamImageTransformer2DModel (MoE feed-forwards), CLIP x2 (128
    positions: the pipeline pads CLIP prompts to 128), T5, Llama.

    HiDream renders every request at its own area, 128 x 128 latents whatever height/width say,
    so the tiny one patchifies 8 x 8 (256 tokens) and has a 2-block VAE (256 px images)."""
    from diffusers import HiDreamImagePipeline

    transformer = tm.tiny_hidream(
        seed, patch_size=8, in_channels=16, out_channels=16, caption_channels=[32, 8], text_emb_dim=32,
        max_resolution=(16, 16),
    )
    return _quiet(HiDreamImagePipeline(
        scheduler=_flow_match(),
        vae=_small_flow_vae(seed + 1),
        text_encoder=tiny_clip_text_encoder(seed + 2, hidden=16, projection_dim=16, with_projection=True,
                                            max_positions=128),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed + 3, hidden=16, projection_dim=16, with_projection=True,
                                              max_positions=128),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 4),
        tokenizer_3=tiny_t5_tokenizer(),
        text_encoder_4=tiny_llama_encoder(seed + 5),
        tokenizer_4=tiny_byte_tokenizer("PreTrainedTokenizerFast", bos=True),
        transformer=transformer,
    ))


WAN_FRAMES = 5  # video frames: (5 - 1) / 4 + 1 = 2 latent frames


def tiny_wan_vae(seed: int = 0, z_dim: int = 4):
    """AutoencoderKLWan (a causal 3-D VAE): 4 stages, spatial scale factor 8, temporal 4 (like the real one)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    ).eval()


def build_wan(seed: int = 0, two_stage: bool = False):
    """WanPipeline (Wan 2.1 text-to-video): WanTransformer3DModel, UMT5, AutoencoderKLWan; call it
    with ``num_frames=WAN_FRAMES`` (``generate`` does). ``two_stage``: Wan 2.2 A14B's layout, a
    second denoiser ``transformer_2`` for the low-noise steps (boundary 0.875 of the 1000 train
    steps: with 2 steps, the first runs ``transformer``, the second ``transformer_2``)."""
    from diffusers import WanPipeline

    second = dict(transformer_2=tm.tiny_wan(seed + 3, text_dim=32), boundary_ratio=0.875) if two_stage else {}
    return _quiet(WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(seed + 2, umt5=True),
        vae=tiny_wan_vae(seed + 1),
        scheduler=_flow_match(),
        transformer=tm.tiny_wan(seed, text_dim=32),
        **second,
    ))


def build_wan22(seed: int = 0):
    return build_wan(seed, two_stage=True)


NEW_BUILDERS = {
    "sd35": build_sd35,
    "flux2": build_flux2,
    "qwenimage": build_qwenimage,
    "zimage": build_zimage,
    "sana": build_sana,
    "lumina2": build_lumina2,
    "chroma": build_chroma,
    "hidream": build_hidream,
    "wan": build_wan,
    "wan22": build_wan22,
}


# --------------------------------------------------------------------------------------------
# calling / saving
# --------------------------------------------------------------------------------------------


def control_image(size: int = DEFAULT_SIZE, seed: int = 0):
    """A deterministic random RGB PIL image of ``size`` x ``size`` for ControlNet pipelines."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)  # uint8 HxWx3 -> RGB


def _family(pipe) -> str:
    import diffusers as d

    # exact families (none of these classes subclasses another, but keep the specific ones first)
    table = [
        (d.StableDiffusionXLControlNetPipeline, "sdxl_controlnet"),
        (d.StableDiffusionControlNetPipeline, "sd_controlnet"),
        (d.StableDiffusionXLPipeline, "sdxl"),
        (d.StableDiffusionPipeline, "sd"),
        (d.StableDiffusion3Pipeline, "sd3"),
        (d.FluxPipeline, "flux"),
        (d.PixArtSigmaPipeline, "pixart_sigma"),
        (d.PixArtAlphaPipeline, "pixart"),
        (d.Flux2Pipeline, "flux2"),
        (d.QwenImagePipeline, "qwenimage"),
        (d.ZImagePipeline, "zimage"),
        (d.SanaPipeline, "sana"),
        (d.Lumina2Pipeline, "lumina2"),
        (d.ChromaPipeline, "chroma"),
        (d.HiDreamImagePipeline, "hidream"),
        (d.WanPipeline, "wan"),
    ]
    for cls, name in table:
        if isinstance(pipe, cls):
            return name
    raise TypeError(f"no tiny-pipeline family for {type(pipe).__name__}")


def pipeline_kwargs(pipe, size: int = DEFAULT_SIZE, control_seed: int = 0) -> dict:
    """Family-specific extra kwargs ``generate`` passes to ``pipe(...)``."""
    fam = _family(pipe)
    if fam in ("sd_controlnet", "sdxl_controlnet"):
        return {"image": control_image(size, control_seed)}
    if fam == "flux":
        return {"max_sequence_length": T5_MAX_LEN}
    if fam == "sd3":
        return {"max_sequence_length": T5_MAX_LEN}
    if fam in ("pixart", "pixart_sigma"):
        # binning only knows sample sizes 32/64/128 (256..1024 px); clean_caption needs bs4+ftfy
        return {"max_sequence_length": T5_MAX_LEN, "use_resolution_binning": False, "clean_caption": False}
    if fam in ("chroma", "hidream"):
        return {"max_sequence_length": T5_MAX_LEN}
    if fam == "sana":  # no long "complex human instruction" prefix; binning would render at 512 px
        return {"max_sequence_length": LM_MAX_LEN, "use_resolution_binning": False, "complex_human_instruction": None}
    if fam == "zimage":  # pads to max_sequence_length (512 by default)
        return {"max_sequence_length": LM_MAX_LEN}
    if fam == "wan":  # a short video; the prompt is padded to max_sequence_length (512 by default)
        return {"num_frames": WAN_FRAMES, "max_sequence_length": T5_MAX_LEN}
    # flux2, qwenimage, lumina2: their defaults (a system prompt comes before the user's)
    return {}


def generate(
    pipe,
    prompt: str = "a red circle",
    seed: int = 0,
    steps: int = 2,
    size: int = DEFAULT_SIZE,
    output_type: str = "latent",
    **kwargs,
):
    """Run ``pipe`` once (generator-seeded) and return ``.images`` (video pipelines: ``.frames``).

    With the default ``output_type="latent"`` this is a tensor of latents (Flux: packed,
    shape (1, (size/16)**2, 64)); with ``"pil"`` a list of PIL images.  ``kwargs`` override the
    family defaults from ``pipeline_kwargs``.
    """
    call = dict(
        prompt=prompt,
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    )
    call.update(pipeline_kwargs(pipe, size))
    call.update(kwargs)
    with torch.no_grad():
        out = pipe(**call)
    return out.frames if hasattr(out, "frames") else out.images  # (video pipelines: frames)


def realign_(pipe):
    """Copy every parameter / buffer of every module component into fresh (64-byte aligned) memory.

    Why: tensors loaded from ``.safetensors`` by ``from_pretrained`` are only 8-byte aligned
    (``data_ptr() % 64 == 24`` here), and PyTorch's CPU matmul kernels round differently for
    unaligned operands (~1e-7 per op).  A reloaded pipeline therefore gives latents that are
    ``allclose`` but not always ``torch.equal`` to the in-memory original (Flux shows it with the
    tiny configs here).  Values are untouched; only the memory they live in changes.  Returns
    ``pipe``.
    """
    with torch.no_grad():
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                for t in list(comp.parameters()) + list(comp.buffers()):
                    t.data = t.data.clone(memory_format=torch.contiguous_format)
    return pipe


def none_components(pipe) -> dict:
    """``{name: None}`` for the required components that ``pipe`` holds as None.

    ``save_pretrained`` writes ``[null, null]`` for them ("... cannot be saved"), and
    ``from_pretrained`` then raises ``ValueError: Pipeline ... expected [...] but only {...} were
    passed`` unless they are passed explicitly, e.g. SD3 without T5 needs
    ``from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)``.  Optional components
    (``safety_checker``, ``feature_extractor``, ``image_encoder`` ...) need nothing.
    """
    optional = set(getattr(pipe, "_optional_components", []) or [])
    return {name: None for name, comp in pipe.components.items() if comp is None and name not in optional}


def save_and_reload(pipe, tmp_dir, realign: bool = True):
    """``save_pretrained(tmp_dir, safe_serialization=True)`` then ``type(pipe).from_pretrained(tmp_dir)``.

    This is the plain local-folder loading path (no hub, nothing downloaded).  With
    ``realign=True`` (default) the loaded weights are passed through ``realign_`` so that
    ``generate`` on the result is bit-identical to the original; ``realign=False`` returns
    exactly what ``from_pretrained`` gave (equal only up to ~1e-6, see ``realign_``).
    """
    tmp_dir = os.fspath(tmp_dir)
    pipe.save_pretrained(tmp_dir, safe_serialization=True)
    loaded = type(pipe).from_pretrained(tmp_dir, **none_components(pipe))
    loaded.set_progress_bar_config(disable=True)
    return realign_(loaded) if realign else loaded


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread meanwhile (two OpenMP threads on the two shared, busy cores stall for
    seconds per tiny op); the previous count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
