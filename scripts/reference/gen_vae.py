"""Tiny random diffusers AutoencoderKL (diffusers 0.33.1) → tests/fixtures/vae.

Same block structure as SD-1.5's VAE (DownEncoderBlock2D / UpDecoderBlock2D, mid block with one
single-head group-norm attention) at tiny width: block_out_channels (16, 32, 32), layers_per_block 2,
norm_num_groups 8, latent 4, 16×16 RGB input → 4×4 latents.

io.safetensors:
  x                 (2, 3, 16, 16)  input image in [-1, 1]-ish
  mean, logvar      (2, 4, 4, 4)    posterior (logvar clamped to [-30, 20] as diffusers)
  noise             (2, 4, 4, 4)    fixed standard-normal noise
  sample            (2, 4, 4, 4)    mean + exp(0.5·logvar)·noise
  decoded           (2, 3, 16, 16)  vae.decode(sample)
  decoded_mean      (2, 3, 16, 16)  vae.decode(mean)
  latents_scaled    (2, 4, 4, 4)    sample · scaling_factor (what the pipelines feed the U-Net)
  decoded_scaled    (2, 3, 16, 16)  vae.decode(latents_scaled / scaling_factor)
  image_uint8       (2, 16, 16, 3)  VaeImageProcessor.postprocess(decoded_scaled, "np") → ×255 round,
                                    as diffusers' numpy_to_pil (stored as float32)
"""
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from common import randomize_, save_fixture, seed

seed(0)
cfg = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
    scaling_factor=0.18215,
)
vae = AutoencoderKL(**cfg).eval()
randomize_(vae, s=1)

g = torch.Generator().manual_seed(2)
x = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).float()
posterior = vae.encode(x).latent_dist
mean, logvar = posterior.mean, posterior.logvar
noise = torch.randn(mean.shape, generator=g)
sample = mean + posterior.std * noise
decoded = vae.decode(sample).sample
decoded_mean = vae.decode(mean).sample
sf = vae.config.scaling_factor
latents_scaled = sample * sf
decoded_scaled = vae.decode(latents_scaled / sf).sample
proc = VaeImageProcessor(vae_scale_factor=4)
img = proc.postprocess(decoded_scaled, output_type="np")  # float in [0, 1], NHWC
image_uint8 = torch.from_numpy((img * 255).round().astype("uint8")).float()

config = dict(vae.config)
config["_class_name"] = "AutoencoderKL"
save_fixture(
    "vae",
    config,
    vae.state_dict(),
    dict(
        x=x,
        mean=mean,
        logvar=logvar,
        noise=noise,
        sample=sample,
        decoded=decoded,
        decoded_mean=decoded_mean,
        latents_scaled=latents_scaled,
        decoded_scaled=decoded_scaled,
        image_uint8=image_uint8,
    ),
)
print("logvar range", float(logvar.min()), float(logvar.max()), "decoded range", float(decoded.min()), float(decoded.max()))
