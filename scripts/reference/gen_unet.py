"""Tiny random diffusers UNet2DConditionModel (diffusers 0.33.1) → tests/fixtures/unet.

Same block types as SD-1.5's U-Net (CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn,
UpBlock2D / CrossAttnUpBlock2D, Transformer2DModel with 1×1-conv proj_in/proj_out, GEGLU feed-forward)
at tiny width: block_out_channels (16, 32), layers_per_block 1, norm_num_groups 8,
cross_attention_dim 24, attention_head_dim (= heads, diffusers naming) [2, 4] per block, so the
up path uses the reversed list and the mid block the last entry.

io.safetensors:
  sample            (2, 4, 16, 16)  noisy latents
  timesteps         (2,)            float timesteps, different per row (999, 37.5)
  encoder           (2, 77, 24)     text states
  out               (2, 4, 16, 16)  unet(sample, timesteps, encoder)
  t_emb             (2, 16)         time_proj(timesteps) (sinusoidal embedding)
  emb               (2, 64)         time_embedding(t_emb)
  odd_sample        (1, 4, 9, 7)    odd latent size (upsampled to the skip's size, as diffusers)
  odd_timesteps     (1,)            500
  odd_encoder       (1, 77, 24)
  odd_out           (1, 4, 9, 7)
  cn_down_{i}       residuals added to the 4 skip tensors (ControlNet case), i = 0..3
  cn_mid            residual added after the mid block
  cn_out            (2, 4, 16, 16)  unet(sample, timesteps, encoder, down_block_additional_residuals,
                                    mid_block_additional_residual)
"""
import torch
from diffusers import UNet2DConditionModel

from common import randomize_, save_fixture, seed

seed(0)
cfg = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=[2, 4],
    flip_sin_to_cos=True,
    freq_shift=0,
)
unet = UNet2DConditionModel(**cfg).eval()
randomize_(unet, s=3)

g = torch.Generator().manual_seed(4)
sample = torch.randn(2, 4, 16, 16, generator=g)
timesteps = torch.tensor([999.0, 37.5])
encoder = torch.randn(2, 77, 24, generator=g)
out = unet(sample, timesteps, encoder).sample
t_emb = unet.time_proj(timesteps)
emb = unet.time_embedding(t_emb)

odd_sample = torch.randn(1, 4, 9, 7, generator=g)
odd_timesteps = torch.tensor([500.0])
odd_encoder = torch.randn(1, 77, 24, generator=g)
odd_out = unet(odd_sample, odd_timesteps, odd_encoder).sample

# ControlNet-style residuals: one per skip tensor (conv_in output, resnet outputs, downsampler outputs).
shapes = [(2, 16, 16, 16), (2, 16, 16, 16), (2, 16, 8, 8), (2, 32, 8, 8)]
cn_down = [0.5 * torch.randn(s, generator=g) for s in shapes]
cn_mid = 0.5 * torch.randn(2, 32, 8, 8, generator=g)
cn_out = unet(
    sample,
    timesteps,
    encoder,
    down_block_additional_residuals=tuple(cn_down),
    mid_block_additional_residual=cn_mid,
).sample

io = dict(
    sample=sample,
    timesteps=timesteps,
    encoder=encoder,
    out=out,
    t_emb=t_emb,
    emb=emb,
    odd_sample=odd_sample,
    odd_timesteps=odd_timesteps,
    odd_encoder=odd_encoder,
    odd_out=odd_out,
    cn_mid=cn_mid,
    cn_out=cn_out,
)
for i, r in enumerate(cn_down):
    io[f"cn_down_{i}"] = r

config = dict(unet.config)
config["_class_name"] = "UNet2DConditionModel"
save_fixture("unet", config, unet.state_dict(), io)
print("out std", float(out.std()), "cn diff", float((cn_out - out).abs().max()), "odd std", float(odd_out.std()))
