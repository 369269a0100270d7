"""Tiny random BLIP-Diffusion ProjLayer (diffusers 0.33.1 `pipelines.blip_diffusion.modeling_blip2.ProjLayer`,
identical to LAVIS `blip_diffusion.ProjLayer`) → tests/fixtures/proj.

ProjLayer(in_dim=32, out_dim=32, hidden_dim=128, drop_p=0.1, eps=1e-12) in eval mode (dropout off):
y = x + dense2(quick_gelu(dense1(LayerNorm(x)))). Full size is 768 → 3072 → 768.

config.json holds the constructor arguments (diffusers builds it from qformer_config.hidden_size; there is no
config file of its own).

io.safetensors:
  x  (2, 4, 32)
  y  (2, 4, 32)
"""
import torch
from diffusers.pipelines.blip_diffusion.modeling_blip2 import ProjLayer

from common import randomize_, save_fixture, seed


def main():
    seed(0)
    cfg = dict(in_dim=32, out_dim=32, hidden_dim=128, drop_p=0.1, eps=1e-12)
    proj = ProjLayer(**cfg).eval()
    randomize_(proj, s=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 32, generator=g) * 2.0 + 0.5
    y = proj(x)
    save_fixture("proj", cfg, proj.state_dict(), dict(x=x, y=y))


if __name__ == "__main__":
    main()
