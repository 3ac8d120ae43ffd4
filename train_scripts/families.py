"""The pipeline families train_dreambooth.py trains, and what differs between them: how prompts
become the denoiser's conditioning, images the latents noise is added to, and noisy latents plus a
timestep the denoiser's inputs (and its output a prediction shaped like the latents), each as its
own pipeline's ``__call__`` does it (diffusers 0.42). One small function set per family; the
table FAMILIES (model_index.json ``_class_name`` -> Family) at the end.

Flow-matching families share the rest (``Denoising``): a training FlowMatchEulerDiscreteScheduler
built from the pipeline's scheduler config, noisy = (1 - sigma) x + sigma noise, target noise - x.
The newer families (Flux.2, Qwen-Image, Sana) encode prompts with their pipeline's own
``encode_prompt``; their language-model text encoders stay frozen.

diffusers is imported inside the functions that use it: importing it logs library notices
(bitsandbytes), which the scripts quiet first (``training_loop.quiet_library_logs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import sd_parts
from common import UsageError



def _cast(dtype, **tensors) -> dict:
    """Float tensors in ``dtype``; other values (ids, masks, None) as they are."""
    return {k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in tensors.items()}


def _default(pipe, name: str):
    """The default of ``pipe.__call__``'s argument ``name`` (what generation uses unless told)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _guidance(pipe, args, latents) -> torch.Tensor | None:
    """The guidance embedding's value (--guidance_scale, else the pipeline's default) for
    transformers that have one; None for the others."""

    if not pipe.transformer.config.get("guidance_embeds"):
        return None
    value = args.guidance_scale if args.guidance_scale is not None else _default(pipe, "guidance_scale")
    if value is None:
        raise UsageError(f"{type(pipe).__name__}: its transformer has a guidance embedding; give --guidance_scale.")
    return torch.full((latents.shape[0],), float(value), device=latents.device, dtype=torch.float32)


def _vae_sample(vae, pixels, generator):
    return vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)


# ----------------------------------------------------------------------------------------------
# SD 1.x/2.x, SDXL (UNet; the loss is in sd_parts)
# ----------------------------------------------------------------------------------------------


def encode_sd(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    return sd_parts.encode_clip_prompts("sd", encoders, tokenizers, prompts, device)


def encode_sdxl(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    return sd_parts.encode_clip_prompts("sdxl", encoders, tokenizers, prompts, device)


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5: CLIP x2 (+ T5), patchified inside the transformer
# ----------------------------------------------------------------------------------------------


def encode_sd3(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    """Penultimate hidden states of both CLIP encoders side by side, zero-padded to T5's width,
    then the T5 sequence (zeros without T5); pooled: both CLIP projections."""

    hidden, pooled = [], []
    for encoder, tokenizer in zip(encoders[:2], tokenizers[:2]):
        out = encoder(sd_parts.tokenize(tokenizer, prompts, 77).to(device), output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    if encoders[2] is not None:
        t5 = encoders[2](sd_parts.tokenize(tokenizers[2], prompts, args.max_sequence_length).to(device))[0]
    else:
        t5 = torch.zeros(len(prompts), args.max_sequence_length, pipe.transformer.config.joint_attention_dim,
                         device=device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1)}


def latents_kl(pipe, pixels, generator):
    """SD3 / Flux.1's AutoencoderKL: (sample - shift_factor) * scaling_factor."""
    cfg = pipe.vae.config
    latents = _vae_sample(pipe.vae, pixels, generator)
    return (latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def inputs_sd3(pipe, noisy, t, cond, args, dtype) -> dict:
    return _cast(dtype, hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                 pooled_projections=cond["pooled_projections"])


def same_shape(pipe, pred, noisy):
    return pred


# ----------------------------------------------------------------------------------------------
# Flux.1: pooled CLIP + T5, latents packed 2x2, 3-axis ids, guidance embedding
# ----------------------------------------------------------------------------------------------


def encode_flux(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    pooled = encoders[0](sd_parts.tokenize(tokenizers[0], prompts, 77).to(device), output_hidden_states=False)
    t5 = encoders[1](sd_parts.tokenize(tokenizers[1], prompts, args.max_sequence_length).to(device))[0]
    return {"encoder_hidden_states": t5, "pooled_projections": pooled.pooler_output}


def inputs_flux(pipe, noisy, t, cond, args, dtype) -> dict:
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    hidden = cond["encoder_hidden_states"]
    return dict(
        **_cast(dtype, hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), encoder_hidden_states=hidden,
                pooled_projections=cond["pooled_projections"]),
        timestep=t / 1000,
        guidance=_guidance(pipe, args, noisy),
        txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype),
    )


def output_flux(pipe, pred, noisy):
    from diffusers import FluxPipeline

    _, _, h, w = noisy.shape
    return FluxPipeline._unpack_latents(pred, h, w, 1)  # (latent sides = "pixels" at scale 1)


# ----------------------------------------------------------------------------------------------
# Flux.2: Mistral 3 (hidden states 10/20/30 stacked), VAE latents patchified 2x2 and normalised by
# the VAE's batch-norm statistics, one token per patch, 4-axis (t, h, w, l) ids, guidance embedding
# ----------------------------------------------------------------------------------------------


def encode_flux2(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    embeds, text_ids = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=args.max_sequence_length)
    return {"encoder_hidden_states": embeds, "txt_ids": text_ids}


def latents_flux2(pipe, pixels, generator):
    """As Flux2Pipeline._encode_vae_image, sampled: patchify, then (x - bn mean) / bn std."""

    vae = pipe.vae
    latents = pipe._patchify_latents(_vae_sample(vae, pixels, generator))
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    return (latents - mean) / std


def inputs_flux2(pipe, noisy, t, cond, args, dtype) -> dict:
    return dict(
        **_cast(dtype, hidden_states=pipe._pack_latents(noisy), encoder_hidden_states=cond["encoder_hidden_states"]),
        timestep=t.to(dtype) / 1000,
        guidance=_guidance(pipe, args, noisy),
        txt_ids=cond["txt_ids"],
        img_ids=pipe._prepare_latent_ids(noisy).to(noisy.device),
    )


def output_flux2(pipe, pred, noisy):
    """(B, h*w, C) tokens back to (B, C, h, w): the inverse of Flux2Pipeline._pack_latents."""
    return pred.transpose(1, 2).reshape(noisy.shape)


# ----------------------------------------------------------------------------------------------
# Qwen-Image: Qwen2.5-VL (template prefix dropped, masked), a causal 3-D VAE (one frame) normalised
# by latents_mean / latents_std, latents packed 2x2, image shapes as rotary inputs
# ----------------------------------------------------------------------------------------------


def encode_qwenimage(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    embeds, mask = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=args.max_sequence_length)
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}  # mask None: no padding


def latents_qwenimage(pipe, pixels, generator):
    """One frame of the 3-D VAE, (x - latents_mean) / latents_std, as (B, C, h, w)."""

    cfg = pipe.vae.config
    latents = _vae_sample(pipe.vae, pixels.unsqueeze(2), generator)[:, :, 0]
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
    return (latents - mean) / std


def inputs_qwenimage(pipe, noisy, t, cond, args, dtype) -> dict:
    b, c, h, w = noisy.shape
    return dict(
        **_cast(dtype, hidden_states=pipe._pack_latents(noisy, b, c, h, w),
                encoder_hidden_states=cond["encoder_hidden_states"]),
        encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
        timestep=t.to(dtype) / 1000,
        guidance=_guidance(pipe, args, noisy),
        img_shapes=[[(1, h // 2, w // 2)]] * b,
    )


def output_qwenimage(pipe, pred, noisy):
    _, _, h, w = noisy.shape
    return pipe._unpack_latents(pred, h, w, 1)[:, :, 0]  # (B, C, 1, h, w) -> one frame


# ----------------------------------------------------------------------------------------------
# Sana: Gemma 2 (a fixed-length window; the complex human instruction generation uses), the
# deep-compression VAE, latents as they are, timesteps times the transformer's timestep_scale
# ----------------------------------------------------------------------------------------------


def _instruction(text: str) -> list[str] | None:
    """--complex_human_instruction as the pipeline takes it: lines, or None for "none"."""
    return None if text.lower() == "none" else text.split("\n")


def sana_instruction(pipe, args) -> list[str] | None:
    """--complex_human_instruction, else the one generation uses (the pipeline's default)."""
    given = args.complex_human_instruction
    return _default(pipe, "complex_human_instruction") if given is None else _instruction(given)


def encode_sana(pipe, encoders, tokenizers, prompts, args, device) -> dict:
    embeds, mask, _, _ = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=False, device=device,
        max_sequence_length=args.max_sequence_length, complex_human_instruction=sana_instruction(pipe, args))
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def latents_dc(pipe, pixels, generator):
    return pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent * pipe.vae.config.scaling_factor


def inputs_sana(pipe, noisy, t, cond, args, dtype) -> dict:
    return dict(
        **_cast(dtype, hidden_states=noisy, encoder_hidden_states=cond["encoder_hidden_states"]),
        encoder_attention_mask=cond["encoder_attention_mask"],
        timestep=t * pipe.transformer.config.timestep_scale,
    )


def output_sana(pipe, pred, noisy):
    """The first half of the channels when the transformer also predicts a variance."""
    cfg = pipe.transformer.config
    return pred.chunk(2, dim=1)[0] if cfg.out_channels // 2 == cfg.in_channels else pred


def sana_call(args) -> dict:
    """At --resolution (no binning to the model's aspect-ratio table), with the training instruction."""
    given = args.complex_human_instruction
    return {"max_sequence_length": args.max_sequence_length, "use_resolution_binning": False,
            **({} if given is None else {"complex_human_instruction": _instruction(given)})}


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _sequence_call(args) -> dict:
    return {"max_sequence_length": args.max_sequence_length}


def _no_call(args) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    name: str  # short name: metadata, model card tag
    title: str  # as messages name it
    text_stack: tuple[str, ...]  # the text encoders prompts go through, in order
    encode: Callable  # (pipe, encoders, tokenizers, prompts, args, device) -> conditioning tensors
    trainable_text: tuple[str, ...] = ()  # the CLIP encoders --train_text_encoder adapts
    flow: bool = True  # flow matching (else epsilon / v-prediction UNet)
    max_sequence_length: int | None = None  # the default of --max_sequence_length
    latents: Callable | None = None  # (pipe, pixels, generator) -> latents noise is added to
    inputs: Callable | None = None  # (pipe, noisy, t, cond, args, dtype) -> denoiser kwargs
    output: Callable = same_shape  # (pipe, denoiser output, noisy) -> prediction shaped like noisy
    patch: int = 2  # the VAE latents' sides must be multiples of it (2x2 packing / patches)
    unused_layers: bool = False  # some layers never reach the prediction (DDP's find_unused_parameters)
    call: Callable = field(default=_sequence_call)  # (args) -> pipeline call kwargs (validation images)

    @property
    def denoiser(self) -> str:
        return "transformer" if self.flow else "unet"


FAMILIES = {
    "StableDiffusionPipeline": Family("sd", "SD 1.x/2.x", ("text_encoder",), encode_sd, ("text_encoder",),
                                      flow=False, call=_no_call),
    "StableDiffusionXLPipeline": Family("sdxl", "SDXL", ("text_encoder", "text_encoder_2"), encode_sdxl,
                                        ("text_encoder", "text_encoder_2"), flow=False, call=_no_call),
    "StableDiffusion3Pipeline": Family("sd3", "SD3", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                                       encode_sd3, ("text_encoder", "text_encoder_2"), max_sequence_length=77,
                                       latents=latents_kl, inputs=inputs_sd3, unused_layers=True),
    "FluxPipeline": Family("flux", "Flux.1", ("text_encoder", "text_encoder_2"), encode_flux, ("text_encoder",),
                           max_sequence_length=512, latents=latents_kl, inputs=inputs_flux, output=output_flux),
    "Flux2Pipeline": Family("flux2", "Flux.2", ("text_encoder",), encode_flux2, max_sequence_length=512,
                            latents=latents_flux2, inputs=inputs_flux2, output=output_flux2),
    "QwenImagePipeline": Family("qwenimage", "Qwen-Image", ("text_encoder",), encode_qwenimage,
                                max_sequence_length=1024, latents=latents_qwenimage, inputs=inputs_qwenimage,
                                output=output_qwenimage, unused_layers=True),  # the last block's text stream
    "SanaPipeline": Family("sana", "Sana", ("text_encoder",), encode_sana, max_sequence_length=300,
                           latents=latents_dc, inputs=inputs_sana, output=output_sana, patch=1, call=sana_call),
}
SUPPORTED = ", ".join(f.title for f in FAMILIES.values())


# ----------------------------------------------------------------------------------------------
# noise, prediction, loss
# ----------------------------------------------------------------------------------------------


def training_scheduler(pipe):
    """The flow-matching schedule timesteps are drawn from: the pipeline's scheduler config as a
    FlowMatchEulerDiscreteScheduler (a DPM-Solver with flow sigmas, as Sana ships, keeps its
    flow_shift as the shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(pipe.scheduler.config)
    if config.get("use_flow_sigmas") and config.get("flow_shift"):
        config["shift"] = config["flow_shift"]
    return FlowMatchEulerDiscreteScheduler.from_config(config)


class Denoising:
    """Latents -> (prediction, target, timesteps or sigmas) for one family; the loss of one batch part."""

    def __init__(self, family: Family, args, pipe, denoiser, dtype):
        from diffusers import DDPMScheduler

        self.family, self.args, self.pipe, self.denoiser, self.dtype = family, args, pipe, denoiser, dtype
        if family.flow:
            self.scheduler = training_scheduler(pipe)
        else:
            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            if args.prediction_type is not None:
                self.scheduler.register_to_config(prediction_type=args.prediction_type)

    def latents(self, pixels, generator):
        if not self.family.flow:
            vae = self.pipe.vae
            return (_vae_sample(vae, pixels, generator) * vae.config.scaling_factor).to(self.dtype)
        return self.family.latents(self.pipe, pixels, generator).to(self.dtype)

    def predict(self, latents, cond, batch, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if not self.family.flow:
            noisy, noise, t = sd_parts.unet_noise(self.scheduler, latents, generator, self.args.noise_offset)
            extra = sd_parts.unet_added_cond(self.family.name, cond, batch, self.args.resolution, self.dtype)
            pred = self.denoiser(noisy, t, cond["encoder_hidden_states"].to(self.dtype), return_dict=False, **extra)[0]
            return pred, sd_parts.unet_target(self.scheduler, latents, noise, t), t
        a, bsz = self.args, latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        u = compute_density_for_timestep_sampling(a.weighting_scheme, bsz, a.logit_mean, a.logit_std, a.mode_scale,
                                                  device=latents.device, generator=generator)
        index = (u * self.scheduler.config.num_train_timesteps).long().clamp(0, len(self.scheduler.timesteps) - 1)
        t = self.scheduler.timesteps[index.cpu()].to(latents.device)
        sigmas = self.scheduler.sigmas[index.cpu()].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return self.flow_prediction(noisy, t, cond), noise - latents, sigmas

    def flow_prediction(self, noisy, t, cond) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents at timesteps ``t`` (the scheduler's,
        0-1000), shaped like ``noisy``: the inputs its pipeline's ``__call__`` would give it."""
        f = self.family
        out = self.denoiser(**f.inputs(self.pipe, noisy, t, cond, self.args, self.dtype), return_dict=False)[0]
        return f.output(self.pipe, out, noisy)

    def loss(self, pred, target, t_or_sigmas):
        if not self.family.flow:
            return sd_parts.unet_loss(pred, target, t_or_sigmas, self.scheduler, self.args.snr_gamma)
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weighting = compute_loss_weighting_for_sd3(self.args.weighting_scheme, t_or_sigmas)
        per_sample = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1)
        return per_sample.mean(dim=1).mean()
