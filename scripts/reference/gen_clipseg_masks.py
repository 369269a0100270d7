"""CLIPSeg masks end to end (transformers 4.44.2) → crates/blipd-apps/tests/fixtures/clipseg_masks.

Writes a complete local CLIPSeg folder in the transformers layout, as `blipd data masks --source clipseg
--from <dir>` reads it, plus two small photos and the reference outputs of the whole chain:

  model/config.json, model/model.safetensors      tiny random CLIPSegForImageSegmentation (save_pretrained)
  model/preprocessor_config.json                  CIDAS/clipseg-rd64-refined's image processor values:
                                                  ViTImageProcessor, 352×352, resample 2 (bilinear),
                                                  rescale 1/255, ImageNet mean/std
  model/vocab.json, model/merges.txt, …           CLIPTokenizer (the 544-token tiny vocabulary of
                                                  crates/blipd-models/tests/fixtures/tokenizers/tiny_clip)
  images/<id>.png                                 2 RGB photos (DreamBench crops): 96×72 (upscaled to 352)
                                                  and 360×176 (x downscaled, y upscaled by the processor)
  subjects.csv                                    the kept-subjects CSV naming them (class = prompt)
  io.safetensors:
    input_ids (2, L) int64, attention_mask (2, L) int64     CLIPSegProcessor(text=classes, padding=True)
    pixel_values_sub (2, 3, 32, 32)                         pixel_values[:, :, ::11, ::11]
    pixel_sums (2, 3)                                       pixel_values summed per channel (float64 → f32)
    probs (2, 352, 352)                                     sigmoid(logits)
    mask_0 (72, 96), mask_1 (88, 180)                       sigmoid(bilinear(logits → image size,
                                                            align_corners=False)); mask_1 at [::2, ::2]

`--full-size DIR` instead writes a random-weight model at the real rd64-refined size (config = the hub
config.json, 150.7 M parameters; the tiny vocabulary stands in for the 49,408-token one) to DIR/model and
its probability maps for the two fixture images to DIR/io.safetensors, for the ignored full-width check
`BLIPD_CLIPSEG_FULL=DIR cargo test -p blipd-apps --test segment full_size -- --ignored --nocapture`.

The tiny model keeps the real checkpoint's structure at 352 px: ViT patch 16 and image_size 224 (the 14×14
position table is bicubic-interpolated to the 22×22 grid), the refined head (two stride-4 transposed
convolutions → 352×352 logits), the legacy text `eos_token_id: 2` (pooling at the argmax id: `<|endoftext|>`
is the largest id of the tiny vocabulary too).
"""
import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

from common import ROOT, randomize_, seed

OUT = ROOT / "crates" / "blipd-apps" / "tests" / "fixtures" / "clipseg_masks"
TINY_CLIP = ROOT / "crates" / "blipd-models" / "tests" / "fixtures" / "tokenizers" / "tiny_clip"
DREAMBENCH = ROOT.parent / "shared" / "dreambench"

# (ImageID, class name, DreamBench source, crop box in the 512×512 source, stored size)
IMAGES = [
    ("0a1b2c3d4e5f6071", "dog", "dog/00.jpg", (64, 96, 448, 384), (96, 72)),
    ("1f2e3d4c5b6a7988", "stuffed animal", "bear_plushie/00.jpg", (0, 131, 512, 381), (360, 176)),
]

torch.set_grad_enabled(False)
seed(0)


def make_images():
    d = OUT / "images"
    d.mkdir(parents=True, exist_ok=True)
    for image_id, _, src, box, size in IMAGES:
        p = d / f"{image_id}.png"
        if p.is_file():
            continue  # committed: keep the exact pixels the reference was computed on
        im = Image.open(DREAMBENCH / src).convert("RGB").crop(box).resize(size, Image.LANCZOS)
        im.save(p, optimize=True)


def full_size_model():
    """A random-weight CLIPSegForImageSegmentation at the real size (the hub config.json of
    CIDAS/clipseg-rd64-refined); also scripts/bench/clipseg_ref.py's model."""
    config = CLIPSegConfig(
        text_config=dict(bos_token_id=0, eos_token_id=2),
        vision_config=dict(patch_size=16),
        extract_layers=[3, 6, 9],
        reduce_dim=64,
        use_complex_transposed_convolution=True,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    randomize_(model, s=11)
    model.decoder.transposed_convolution[4].weight.mul_(12.0)
    return model


def full_size(out):
    """Random weights at the real size → DIR/model, and the fixture images' probabilities."""
    out = pathlib.Path(out)
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model = full_size_model()
    model.save_pretrained(model_dir, safe_serialization=True)
    save_processor(model_dir)
    processor = CLIPSegProcessor.from_pretrained(model_dir)
    model = CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()
    images = [Image.open(OUT / "images" / f"{i}.png").convert("RGB") for i, *_ in IMAGES]
    classes = [c for _, c, *_ in IMAGES]
    inputs = processor(text=classes, images=images, padding=True, return_tensors="pt")
    probs = torch.sigmoid(model(**inputs).logits)
    save_file({"probs": probs.contiguous()}, str(out / "io.safetensors"))
    print("full size:", sum(p.numel() for p in model.parameters()), "parameters →", out,
          "probs in", float(probs.min()), float(probs.max()))


def save_processor(model_dir):
    tokenizer = CLIPTokenizer(
        str(TINY_CLIP / "vocab.json"),
        str(TINY_CLIP / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 352, "width": 352},
        resample=Image.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(model_dir)
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert pp["resample"] == 2 and pp["size"] == {"height": 352, "width": 352}, pp


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    make_images()
    model_dir = OUT / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)

    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=544,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=16,
        extract_layers=[1, 2, 3],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=24,
        conditional_layer=0,
        use_complex_transposed_convolution=True,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    randomize_(model, s=7)
    # Sharper decisions than randn/√fan_in give: logits spread over a few units, so the sigmoid map has
    # values near 0, near 1 and in between (all of which the test compares).
    model.decoder.transposed_convolution[4].weight.mul_(12.0)
    model.decoder.transposed_convolution[4].bias.fill_(0.5)
    model.save_pretrained(model_dir, safe_serialization=True)
    save_processor(model_dir)

    # Reload everything from the folder, as a user of the hub checkpoint would.
    processor = CLIPSegProcessor.from_pretrained(model_dir)
    model = CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()

    images = [Image.open(OUT / "images" / f"{i}.png").convert("RGB") for i, *_ in IMAGES]
    classes = [c for _, c, *_ in IMAGES]
    inputs = processor(text=classes, images=images, padding=True, return_tensors="pt")
    pv = inputs["pixel_values"]
    assert pv.shape == (2, 3, 352, 352), pv.shape
    logits = model(**inputs).logits
    assert logits.shape == (2, 352, 352), logits.shape
    probs = torch.sigmoid(logits)

    io = dict(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values_sub=pv[:, :, ::11, ::11].contiguous(),
        pixel_sums=pv.double().sum(dim=(2, 3)).float(),
        probs=probs,
    )
    for i, im in enumerate(images):
        w, h = im.size
        up = F.interpolate(logits[i][None, None], size=(h, w), mode="bilinear", align_corners=False)
        # The larger map is stored at every other pixel (fixture size).
        step = 1 if i == 0 else 2
        io[f"mask_{i}"] = torch.sigmoid(up)[0, 0, ::step, ::step]
    save_file({k: v.contiguous() for k, v in io.items()}, str(OUT / "io.safetensors"))

    with open(OUT / "subjects.csv", "w") as f:
        f.write("ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax\n")
        f.write(f"{IMAGES[0][0]},/m/0bt9lr,Dog,0.1,0.9,0.05,0.95\n")
        f.write(f"{IMAGES[1][0]},/m/0kmg4,Stuffed animal,0.2,0.8,0.1,0.9\n")

    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print("input_ids", inputs["input_ids"].tolist())
    print(
        "logits range",
        float(logits.min()),
        float(logits.max()),
        "probs ≥0.9:",
        float((probs >= 0.9).float().mean()),
        "≤0.1:",
        float((probs <= 0.1).float().mean()),
    )
    print(f"clipseg_masks: {size / 1024:.0f} KiB in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-size", metavar="DIR", help="write a real-size random model + reference to DIR")
    args = ap.parse_args()
    if args.full_size:
        full_size(args.full_size)
    else:
        main()
