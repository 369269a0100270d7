"""DINO ViT (transformers 4.44.2 `ViTModel`, the layout of `facebook/dino-vits16`) and its image processor
→ crates/blipd-models/tests/fixtures/dino.

  config.json, weights.safetensors   tiny random ViTModel saved without the pooler, as the hub's DINO
                                     checkpoints are (`convert_dino_to_pytorch.py` builds
                                     `ViTModel(config, add_pooling_layer=False)`)
  preprocessor_config.json           facebook/dino-vits16's file (transcribed, not downloaded): ViTFeatureExtractor, size 224
                                     (squash to 224×224, no crop), resample 2 (bilinear), ImageNet mean/std
  tiny_preprocessor_config.json      the same at size 32 (what the tiny model takes), for end-to-end tests
  image.png                          187×150 RGB photo (DreamBench dog/00.jpg, cropped and resized)
  io.safetensors:
    pixel_values (2, 3, 32, 32), last_hidden_state (2, 17, 32)        random input, native grid
    pixel_values_interp (1, 3, 48, 40), last_hidden_state_interp       interpolate_pos_encoding=True
    image_pixel_values_224 (1, 3, 224, 224)                           the real processor on image.png
    image_pixel_values (1, 3, 32, 32), image_cls (1, 32)              tiny processor → last_hidden_state[:, 0]
"""
import json
import pathlib

import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from common import ROOT, out_dir, randomize_, save_fixture, seed

DREAMBENCH = ROOT.parent / "shared" / "dreambench"
NAME = "dino"

# facebook/dino-vits16 preprocessor_config.json (transcribed from the hub file; no download here).
HUB_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,
    "size": 224,
}


def make_image(d: pathlib.Path):
    p = d / "image.png"
    if not p.is_file():  # committed: keep the exact pixels the references were computed on
        im = Image.open(DREAMBENCH / "dog" / "00.jpg").convert("RGB").crop((40, 60, 480, 412))
        im.resize((187, 150), Image.LANCZOS).save(p, optimize=True)
    return Image.open(p).convert("RGB")


def main():
    seed(0)
    d = out_dir(NAME)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    randomize_(model, s=3)
    sd = model.state_dict()
    assert not any(k.startswith("pooler") for k in sd)

    tiny_pp = dict(HUB_PREPROCESSOR, size=32)
    (d / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR, indent=2) + "\n")
    (d / "tiny_preprocessor_config.json").write_text(json.dumps(tiny_pp, indent=2) + "\n")
    # Load both the way AutoImageProcessor would (from the JSON files).
    real = ViTImageProcessor.from_pretrained(d)
    assert real.size == {"height": 224, "width": 224} and real.resample == 2, real
    tiny = ViTImageProcessor(**{k: v for k, v in tiny_pp.items() if k != "feature_extractor_type"})

    image = make_image(d)
    pv224 = real(images=image, return_tensors="pt")["pixel_values"]
    pv32 = tiny(images=image, return_tensors="pt")["pixel_values"]
    assert pv224.shape == (1, 3, 224, 224) and pv32.shape == (1, 3, 32, 32)

    x = torch.randn(2, 3, 32, 32)
    out = model(pixel_values=x).last_hidden_state
    xi = torch.randn(1, 3, 48, 40)
    out_i = model(pixel_values=xi, interpolate_pos_encoding=True).last_hidden_state
    cls = model(pixel_values=pv32).last_hidden_state[:, 0]

    io = dict(
        pixel_values=x,
        last_hidden_state=out,
        pixel_values_interp=xi,
        last_hidden_state_interp=out_i,
        image_pixel_values_224=pv224,
        image_pixel_values=pv32,
        image_cls=cls,
    )
    save_fixture(NAME, config.to_dict(), sd, io)


if __name__ == "__main__":
    main()
