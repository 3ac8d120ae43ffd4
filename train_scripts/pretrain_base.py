"""Pretrain the embedded default: a tiny Stable-Diffusion-architecture pipeline on diffadapt.embedded.world.

Two stages, both from scratch and offline:
  1. AutoencoderKL (3 levels: 64x64 RGB <-> 16x16x4 latents), MSE + tiny KL;
  2. UNet2DConditionModel + CLIPTextModel trained together on cached latents of world scenes
     (epsilon prediction, min-SNR-5 weighting, 10% empty captions for classifier-free guidance,
     EMA of the UNet and text encoder weights).
The full pipeline (with the offline CLIPTokenizer and a DDIM scheduler) is saved with
StableDiffusionPipeline.save_pretrained every --checkpoint_minutes, so a partial run is usable.

    nice -n 19 python train_scripts/pretrain_base.py --output_dir diffadapt/embedded/assets/base_model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffadapt.embedded import world
from diffadapt.embedded.tokenizer import write_tokenizer_files

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sd_parts  # noqa: E402  (labelled_grid)

SAMPLE_PROMPTS = [
    "a large red circle on a blue background",
    "a large yellow star on a black background",
    "a small green triangle on a white background",
    "a large striped blue square on an orange background",
    "a large white hexagon on a purple background",
    "a large dotted orange cross on a green background",
    "a small purple star on a yellow background in the top left",
    "a photo of a hexagon",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="diffadapt/embedded/assets/base_model")
    p.add_argument("--work_dir", default=None, help="caches, VAE checkpoint, sample grids (default: $TMPDIR/diffadapt_pretrain)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num_scenes", type=int, default=40000, help="rendered training scenes (latents are cached)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch sampling")
    p.add_argument("--data_seed", type=int, default=0, help="which world scenes are rendered")
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--vae_batch_size", type=int, default=16)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_crop", type=int, default=32, help="train the (convolutional) VAE on random crops: 4x cheaper")
    p.add_argument("--max_train_steps", type=int, default=20000, help="UNet + text-encoder steps")
    p.add_argument("--max_minutes", type=float, default=45.0, help="stop the UNet stage after this wall time")
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--beta_schedule", default="linear",
                   help="DDPM's linear 1e-4..0.02 by default: SD's scaled_linear leaves so much signal at t=T in "
                        "16x16 latents that the model reads the background colour off the initial noise")
    p.add_argument("--beta_start", type=float, default=0.0001)
    p.add_argument("--beta_end", type=float, default=0.02)
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="v_prediction",
                   help="v (default): at high noise v is -x0, so the loss teaches the text -> layout/colour map "
                        "that epsilon's loss barely weighs there (the model then reads colours off the noise)")
    p.add_argument("--zero_terminal_snr", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale the betas to zero SNR at t=T (Lin et al. 2024; needs v_prediction) and sample "
                        "with trailing timesteps, so no signal is left in the initial noise")
    p.add_argument("--checkpoint_minutes", type=float, default=10.0)
    p.add_argument("--unet_channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--text_hidden", type=int, default=64)
    p.add_argument("--text_layers", type=int, default=4)
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--save_fp16", action="store_true", help="store weights in float16 (halves the size)")
    p.add_argument("--resume_from", default=None,
                   help="a saved pipeline folder: continue training its unet and text encoder (VAE from --work_dir)")
    p.add_argument("--samples_only", action="store_true",
                   help="no training: load <output_dir> with from_pretrained and write <output_dir>/samples.png")
    return p.parse_args(argv)


def build_vae(res):
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=res,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def build_unet(latent_res, channels, cross_dim):
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_res, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=16,
    )


def build_text_encoder(vocab_size, hidden, layers, tokenizer):
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def render_scenes(n, seed, res):
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(world.render(s, res)) for s in scenes])  # n, H, W, 3 uint8
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def to_float(px):
    return px.float() / 127.5 - 1.0


def train_vae(args, pixels, path):
    torch.manual_seed(args.seed)
    vae = build_vae(args.resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.vae_steps):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        x = to_float(pixels[torch.randint(0, len(pixels), (args.vae_batch_size,), generator=g)])
        if args.vae_crop < args.resolution:
            i, j = (int(v) for v in torch.randint(0, (args.resolution - args.vae_crop) // 4 + 1, (2,), generator=g) * 4)
            x = x[:, :, i:i + args.vae_crop, j:j + args.vae_crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval()
    with torch.no_grad():  # scale latents to unit variance, as SD's scaling_factor does
        std = torch.cat([vae.encode(to_float(pixels[i:i + 256])).latent_dist.mean for i in range(0, min(len(pixels), 2048), 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    vae.save_pretrained(path)
    return vae


@torch.no_grad()
def encode_all(vae, pixels):
    means, stds = [], []
    for i in range(0, len(pixels), 256):
        d = vae.encode(to_float(pixels[i:i + 256])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def save_pipeline(args, vae, text_encoder, unet, tok_dir, tokenizer):
    dtype = torch.float16 if args.save_fp16 else torch.float32
    pipe = make_pipeline(copy.deepcopy(vae).to(dtype), copy.deepcopy(text_encoder).to(dtype),
                         copy.deepcopy(unet).to(dtype), tokenizer, args)
    tmp = args.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # also loadable by slow tokenizers of transformers 4
        shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, "tokenizer", name))
    os.makedirs(args.output_dir, exist_ok=True)
    for name in os.listdir(tmp):  # replace the saved parts, keep README.md (model card) / samples.png
        dst = os.path.join(args.output_dir, name)
        shutil.rmtree(dst, ignore_errors=True) if os.path.isdir(dst) else None
        shutil.move(os.path.join(tmp, name), dst)
    shutil.rmtree(tmp, ignore_errors=True)


def schedule(args):
    """Noise schedule and prediction type, shared by the training and the sampling scheduler."""
    return dict(beta_schedule=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta_end,
                num_train_timesteps=1000, prediction_type=args.prediction_type,
                rescale_betas_zero_snr=args.zero_terminal_snr)


def make_pipeline(vae, text_encoder, unet, tokenizer, args):
    spacing = "trailing" if args.zero_terminal_snr else "leading"  # trailing: the first step is t = T
    scheduler = DDIMScheduler(**schedule(args), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing=spacing)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sample_grid(pipe, path, prompts=SAMPLE_PROMPTS, n=6, steps=25, seed=0, zoom=2):
    """One row per prompt (its text on the left), ``n`` samples per row, upscaled ``zoom`` x."""
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        g = torch.Generator().manual_seed(seed)
        rows.append((prompt, pipe(prompt, num_inference_steps=steps, num_images_per_prompt=n, generator=g).images))
    sd_parts.labelled_grid(rows, path, size=pipe.unet.config.sample_size * pipe.vae_scale_factor * zoom, label_width=330)


def main(args):
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        raise SystemExit("error: --zero_terminal_snr needs --prediction_type v_prediction (epsilon is undefined at SNR 0)")
    torch.set_num_threads(args.num_threads)
    if args.samples_only:
        pipe = StableDiffusionPipeline.from_pretrained(args.output_dir)
        sample_grid(pipe, os.path.join(args.output_dir, "samples.png"), SAMPLE_PROMPTS + [world.INSTANCE_PROMPT])
        return
    torch.manual_seed(args.seed)
    work = args.work_dir or os.path.join(tempfile.gettempdir(), "diffadapt_pretrain")
    os.makedirs(work, exist_ok=True)
    t_start = time.time()

    tok_dir = write_tokenizer_files(os.path.join(work, "tokenizer"))
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    cache = os.path.join(work, f"scenes_{args.num_scenes}_{args.data_seed}_{args.resolution}.pt")
    if os.path.exists(cache):
        scenes, pixels = torch.load(cache, weights_only=False)
    else:
        scenes, pixels = render_scenes(args.num_scenes, args.data_seed, args.resolution)
        torch.save((scenes, pixels), cache)
    print(f"{len(scenes)} scenes ready ({time.time() - t_start:.0f}s)", flush=True)

    vae_path = os.path.join(work, "vae")
    latent_cache = cache.replace("scenes_", "latents_")
    if args.resume_from:
        vae = AutoencoderKL.from_pretrained(args.resume_from, subfolder="vae").float().eval()
    elif os.path.exists(os.path.join(vae_path, "config.json")):
        vae = AutoencoderKL.from_pretrained(vae_path).eval()
    else:
        vae = train_vae(args, pixels, vae_path)
        if os.path.exists(latent_cache):
            os.remove(latent_cache)
    vae.requires_grad_(False)
    t_vae = time.time() - t_start
    if os.path.exists(latent_cache):  # encoding 40k scenes takes minutes on a shared CPU
        means, stds = torch.load(latent_cache)
    else:
        means, stds = encode_all(vae, pixels)
        torch.save((means, stds), latent_cache)
    sf = vae.config.scaling_factor
    print(f"latents {tuple(means.shape)} scaling_factor {sf:.3f} ({time.time() - t_start:.0f}s)", flush=True)

    latent_res = args.resolution // 4
    if args.resume_from:
        unet = UNet2DConditionModel.from_pretrained(args.resume_from, subfolder="unet").float().train()
        text_encoder = CLIPTextModel.from_pretrained(args.resume_from, subfolder="text_encoder").float().train()
    else:
        unet = build_unet(latent_res, args.unet_channels, args.text_hidden)
        text_encoder = build_text_encoder(len(tokenizer), args.text_hidden, args.text_layers, tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler(**schedule(args))
    acp = noise_scheduler.alphas_cumprod
    snr = acp / (1 - acp)

    rng = random.Random(args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 1)
    t_unet, last_ckpt, step, losses = time.time(), time.time(), 0, []
    log = {"args": vars(args), "vae_seconds": round(t_vae), "checkpoints": []}
    while step < args.max_train_steps and time.time() - t_unet < args.max_minutes * 60:
        idx = torch.randint(0, len(scenes), (args.train_batch_size,), generator=g)
        caps = ["" if rng.random() < args.caption_dropout else world.caption(scenes[i], rng) for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * sf
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        for group in opt.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / args.lr_warmup_steps)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        if args.prediction_type == "v_prediction":
            # min-SNR-gamma in x0 terms, min(snr + 1, gamma): unlike min(snr, gamma) it keeps the
            # high-noise steps (where the text decides the picture) weighted, t=T included
            target, weight = noise_scheduler.get_velocity(latents, noise, t), torch.clamp(snr[t] + 1, max=args.snr_gamma) / (snr[t] + 1)
        else:
            target, weight = noise, torch.clamp(snr[t], max=args.snr_gamma) / snr[t]
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - t_unet:.0f}s)", flush=True)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_pipeline(args, vae, ema_text, ema_unet, tok_dir, tokenizer)
            sample_grid(make_pipeline(vae, ema_text, ema_unet, tokenizer, args), os.path.join(work, f"samples_{step:06d}.png"), n=4)
            log["checkpoints"].append({"step": step, "minutes": round((time.time() - t_start) / 60, 1)})
            print(f"checkpoint at step {step}", flush=True)
            last_ckpt = time.time()
    save_pipeline(args, vae, ema_text, ema_unet, tok_dir, tokenizer)
    sample_grid(make_pipeline(vae, ema_text, ema_unet, tokenizer, args), os.path.join(work, f"samples_{step:06d}.png"), n=4)
    log.update(unet_steps=step, final_loss=float(np.mean(losses[-200:])), total_minutes=round((time.time() - t_start) / 60, 1))
    with open(os.path.join(work, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(json.dumps({k: v for k, v in log.items() if k != "args"}), flush=True)


if __name__ == "__main__":
    main(parse_args())
