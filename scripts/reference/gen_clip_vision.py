"""Tiny random BLIP-2 vision tower (diffusers 0.33.1 `pipelines.blip_diffusion.modeling_blip2.Blip2VisionModel`,
configured by transformers 4.44.2 `Blip2VisionConfig`) → tests/fixtures/clip_vision.

This is BLIP-Diffusion's CLIP ViT-L/14 (23 layers, quick_gelu, all 257 tokens, `post_layernorm` = LAVIS
`ln_vision`) at tiny width: hidden 32, 4 heads, 2 layers, MLP 64, 28×28 images with patch 7 → 16 patches + CLS.

Two configs:
  a  quick_gelu, qkv_bias=True, layer_norm_eps 1e-6 (the diffusers/transformers default)  → config.json,
     weights.safetensors, io keys without prefix
  b  gelu, qkv_bias=False, layer_norm_eps 1e-5 (LAVIS's torch default)                   → config_b.json,
     weights_b.safetensors, io keys `b_*`
Config a is also run through LAVIS's own CLIP ViT code (`lavis/models/clip_vit.py` from the PyPI wheel
salesforce-lavis==1.0.2, see gen_qformer.py) from LAVIS-named weights (`weights_lavis.safetensors`:
`visual_encoder.*` CLIP names + `ln_vision.*`, i.e. a `blip_weight.pt`-style Blip2Qformer-relative layout),
which uses LayerNorm eps 1e-5 → io `lavis_last_hidden_state`.

io.safetensors:
  pixel_values        (2, 3, 28, 28)
  last_hidden_state   (2, 17, 32)   after post_layernorm
  pooler_output       (2, 32)       post_layernorm(last_hidden_state[:, 0]) (normalised twice, as diffusers)
  lavis_last_hidden_state (2, 17, 32)
  b_last_hidden_state (2, 17, 32)
"""
import json

import torch
from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2VisionModel
from safetensors.torch import save_file
from transformers.models.blip_2.configuration_blip_2 import Blip2VisionConfig

from common import out_dir, randomize_, save_fixture, seed
from gen_qformer import lavis_vit_module, vit_diffusers_to_lavis


def build(s, **kw):
    kw = dict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=28, patch_size=7), **kw)
    cfg = Blip2VisionConfig(**kw)
    model = Blip2VisionModel(cfg).eval()
    randomize_(model, s=s)
    return cfg, model


def main():
    seed(0)
    g = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, 28, 28, generator=g)

    cfg_a, a = build(1, hidden_act="quick_gelu")
    out_a = a(pixel_values)
    cfg_b, b = build(3, hidden_act="gelu", qkv_bias=False, layer_norm_eps=1e-5)
    assert not any(k.endswith("qkv.bias") for k in b.state_dict())
    out_b = b(pixel_values)

    # LAVIS code path on config a's weights (needs MLP = 4 × width: LAVIS hard-codes it).
    cfg_l, m_l = build(5, hidden_act="quick_gelu", intermediate_size=128)
    vit_sd, ln_vision = vit_diffusers_to_lavis(m_l.state_dict())
    cv = lavis_vit_module()
    # wheel 1.0.2 builds `layers - 1` blocks (LAVIS main builds `layers`); ask for one more.
    lvit = cv.VisionTransformer(28, 7, 32, cfg_l.num_hidden_layers + 1, 4, False).eval()
    lvit.load_state_dict(vit_sd, strict=True)
    ln = torch.nn.LayerNorm(32)  # ln_vision, torch default eps 1e-5
    ln.load_state_dict(ln_vision)
    lavis_out = ln(lvit(pixel_values))
    diff = (lavis_out - m_l(pixel_values).last_hidden_state).abs().max().item()
    print(f"LAVIS (eps 1e-5) vs diffusers (eps 1e-6) on the same weights: max-abs {diff:.2e}")

    d = out_dir("clip_vision")
    lavis_sd = {f"visual_encoder.{k}": v for k, v in vit_sd.items()}
    lavis_sd.update({f"ln_vision.{k}": v for k, v in ln_vision.items()})
    save_file({k: v.contiguous().clone() for k, v in lavis_sd.items()}, str(d / "weights_lavis.safetensors"),
              metadata={"format": "pt"})
    cfg_l_dict = cfg_l.to_dict()
    cfg_l_dict["layer_norm_eps"] = 1e-5
    (d / "config_lavis.json").write_text(json.dumps(cfg_l_dict, indent=2, sort_keys=True))
    (d / "config_b.json").write_text(json.dumps(cfg_b.to_dict(), indent=2, sort_keys=True))
    save_file({k: v.contiguous().clone() for k, v in b.state_dict().items()}, str(d / "weights_b.safetensors"),
              metadata={"format": "pt"})

    io = dict(
        pixel_values=pixel_values,
        last_hidden_state=out_a.last_hidden_state,
        pooler_output=out_a.pooler_output,
        lavis_last_hidden_state=lavis_out,
        b_last_hidden_state=out_b.last_hidden_state,
    )
    save_fixture("clip_vision", cfg_a.to_dict(), a.state_dict(), io)


if __name__ == "__main__":
    main()
