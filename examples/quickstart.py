"""A self-contained tour of diffadapt on a tiny UNet built from a config (offline, CPU, seconds).

Adds a BOFT and an HRA adapter, trains them a few steps on a toy denoising target, saves and
reloads one in PEFT's format, then switches, blends, merges and unmerges them.
"""

import copy
import tempfile

import torch
from diffusers import UNet2DConditionModel

import diffadapt as da

torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
inputs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=torch.randn(2, 5, 32))
target = torch.randn(2, 4, 8, 8)
with torch.no_grad():
    base = unet(**inputs).sample
pristine = copy.deepcopy(unet)

for name, config in [("boft", da.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2)),
                     ("hra", da.HRAConfig(r=4))]:
    layers = da.add_adapter(unet, config, name, preset="attention+ff")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(20):
        loss = torch.nn.functional.mse_loss(unet(**inputs).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"{name}: {len(layers)} layers, {sum(p.numel() for p in params)} trainable parameters, loss {loss.item():.4f}")

with tempfile.TemporaryDirectory() as folder:
    da.save_adapter(unet, folder, "boft")
    da.load_adapter(pristine, folder, "boft")
    da.set_adapters(unet, "boft")
    with torch.no_grad():
        same = torch.equal(pristine(**inputs).sample, unet(**inputs).sample)
    print("reloaded BOFT adapter gives identical output:", same)

with torch.no_grad():
    da.set_adapters(unet, ["boft", "hra"], [1.0, 0.5])
    live = unet(**inputs).sample
    da.merge_adapters(unet)
    merged = unet(**inputs).sample
    da.unmerge_adapters(unet)
    da.set_adapters(unet, "boft", 0.0)
    zero = unet(**inputs).sample
print("blend boft@1 + hra@0.5, merged vs live max diff:", (merged - live).abs().max().item())
print("strength 0 equals the base model exactly:", torch.equal(zero, base))
print(da.list_adapters(unet))
