"""Tiny random diffusers ControlNetModel (diffusers 0.33.1) → tests/fixtures/controlnet.

Same layout as lllyasviel's ControlNet v1.0 for SD-1.5 (controlnet_cond_embedding conv_in / blocks /
conv_out, the U-Net's down path + mid block, 1×1 controlnet_down_blocks and controlnet_mid_block) at
tiny width: block_out_channels (16, 32), layers_per_block 1, norm_num_groups 8, cross_attention_dim 24,
attention_head_dim [2, 4], conditioning_embedding_out_channels (4, 8, 8, 16) (three stride-2 convs,
so the conditioning image is 8× the latent size, as with SD's (16, 32, 96, 256)).
randomize_ makes the zero-initialised convs non-zero so the test can fail.

io.safetensors:
  sample        (2, 4, 8, 8)    latents
  timesteps     (2,)            (981, 21.5)
  encoder       (2, 77, 24)
  cond          (2, 3, 64, 64)  conditioning image in [0, 1]
  down_{i}      the 4 down residuals, conditioning_scale 0.7
  mid           mid residual, conditioning_scale 0.7
  guess_down_{i}, guess_mid   guess_mode=True, conditioning_scale 1.0 (logspace(-1, 0) scales)
  bgr_mid       mid residual of a copy configured with controlnet_conditioning_channel_order "bgr"
"""
import torch
from diffusers import ControlNetModel

from common import randomize_, save_fixture, seed

seed(0)
cfg = dict(
    in_channels=4,
    conditioning_channels=3,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=[2, 4],
    conditioning_embedding_out_channels=(4, 8, 8, 16),
    flip_sin_to_cos=True,
    freq_shift=0,
)
cn = ControlNetModel(**cfg).eval()
randomize_(cn, s=5)

g = torch.Generator().manual_seed(6)
sample = torch.randn(2, 4, 8, 8, generator=g)
timesteps = torch.tensor([981.0, 21.5])
encoder = torch.randn(2, 77, 24, generator=g)
cond = torch.rand(2, 3, 64, 64, generator=g)

down, mid = cn(sample, timesteps, encoder, cond, conditioning_scale=0.7, return_dict=False)
gdown, gmid = cn(sample, timesteps, encoder, cond, conditioning_scale=1.0, guess_mode=True, return_dict=False)

cn.register_to_config(controlnet_conditioning_channel_order="bgr")
_, bgr_mid = cn(sample, timesteps, encoder, cond, conditioning_scale=1.0, return_dict=False)
cn.register_to_config(controlnet_conditioning_channel_order="rgb")

io = dict(sample=sample, timesteps=timesteps, encoder=encoder, cond=cond, mid=mid, guess_mid=gmid, bgr_mid=bgr_mid)
for i, (d, gd) in enumerate(zip(down, gdown)):
    io[f"down_{i}"] = d
    io[f"guess_down_{i}"] = gd

config = dict(cn.config)
config["_class_name"] = "ControlNetModel"
save_fixture("controlnet", config, cn.state_dict(), io)
print("down", [tuple(d.shape) for d in down], "mid", tuple(mid.shape), "mid std", float(mid.std()))
