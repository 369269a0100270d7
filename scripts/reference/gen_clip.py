"""CLIP (transformers 4.44.2 `CLIPModel`, the layout of `openai/clip-vit-base-patch32`), its image processor
and tokenizer → crates/blipd-models/tests/fixtures/clip.

  config.json, weights.safetensors   tiny random CLIPModel (text + vision towers, projections, logit_scale),
                                     the text config with the legacy `eos_token_id: 2` of the OpenAI
                                     checkpoints (pooling at the argmax id)
  vocab.json, merges.txt             the 544-token tiny CLIP vocabulary (tests/fixtures/tokenizers/tiny_clip)
  preprocessor_config.json           openai/clip-vit-base-patch32's file (transcribed, not downloaded): CLIPFeatureExtractor,
                                     size 224 (shortest edge), crop_size 224, resample 3 (bicubic), CLIP
                                     mean/std
  tiny_preprocessor_config.json      the same at 32 (what the tiny model takes), for end-to-end tests
  image.png                          187×150 RGB photo (shortest edge 150 → 224 makes the long side 279:
                                     an odd crop margin of 55, so floor vs round-half-even of the offset
                                     matters)
  io.safetensors:
    input_ids (3, L), attention_mask (3, L)     CLIPTokenizer(PROMPTS, padding=True)
    text_features (3, 16), text_embeds (3, 16)  get_text_features / CLIPModel(...).text_embeds (normalised)
    pixel_values (2, 3, 32, 32)                 random
    image_features (2, 16), image_embeds (2, 16)
    logits_per_image (2, 3)
    image_pixel_values_224 (1, 3, 224, 224)     the real processor on image.png
    image_pixel_values (1, 3, 32, 32)           the tiny processor on image.png
    photo_image_embeds (1, 16)                  CLIPModel(...).image_embeds of image.png (tiny processor)
    photo_clip_t (3,)                           cosine(photo image_embeds, text_embeds of each prompt)
"""
import json
import pathlib
import shutil

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from common import ROOT, out_dir, randomize_, save_fixture, seed

DREAMBENCH = ROOT.parent / "shared" / "dreambench"
TINY_CLIP = ROOT / "crates" / "blipd-models" / "tests" / "fixtures" / "tokenizers" / "tiny_clip"
NAME = "clip"
PROMPTS = ["a dog in the jungle", "a red cube shaped dog", "a dog on top of pink fabric"]

# openai/clip-vit-base-patch32 preprocessor_config.json (transcribed from the hub file; no download here).
HUB_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
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
    config = CLIPConfig(
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
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-5,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    randomize_(model, s=5)
    model.logit_scale.fill_(2.0)

    for f in ["vocab.json", "merges.txt"]:
        shutil.copy(TINY_CLIP / f, d / f)
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>")
    tiny_pp = dict(HUB_PREPROCESSOR, size=32, crop_size=32)
    (d / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR, indent=2) + "\n")
    (d / "tiny_preprocessor_config.json").write_text(json.dumps(tiny_pp, indent=2) + "\n")
    real = CLIPImageProcessor.from_pretrained(d)
    assert real.size == {"shortest_edge": 224} and real.crop_size == {"height": 224, "width": 224}, real
    tiny = CLIPImageProcessor(**{k: v for k, v in tiny_pp.items() if k != "feature_extractor_type"})

    image = make_image(d)
    pv224 = real(images=image, return_tensors="pt")["pixel_values"]
    pv32 = tiny(images=image, return_tensors="pt")["pixel_values"]
    assert pv224.shape == (1, 3, 224, 224) and pv32.shape == (1, 3, 32, 32)

    tok = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    x = torch.randn(2, 3, 32, 32)
    out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=x)
    photo = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pv32)
    clip_t = (photo.image_embeds @ photo.text_embeds.T)[0]
    print("input_ids", tok["input_ids"].tolist())
    print("photo CLIP-T", clip_t.tolist())

    io = dict(
        input_ids=tok["input_ids"],
        attention_mask=tok["attention_mask"],
        text_features=model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]),
        text_embeds=out.text_embeds,
        pixel_values=x,
        image_features=model.get_image_features(pixel_values=x),
        image_embeds=out.image_embeds,
        logits_per_image=out.logits_per_image,
        image_pixel_values_224=pv224,
        image_pixel_values=pv32,
        photo_image_embeds=photo.image_embeds,
        photo_clip_t=clip_t,
    )
    save_fixture(NAME, config.to_dict(), model.state_dict(), io)


if __name__ == "__main__":
    main()
