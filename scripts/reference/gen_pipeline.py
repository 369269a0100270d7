"""Tiny random BLIP-Diffusion pipeline → crates/blipd-models/tests/fixtures/pipeline (diffusers 0.33.1).

Builds diffusers' `BlipDiffusionPipeline` from tiny random components, saves it with `save_pretrained` (so the
Rust side loads a real diffusers folder: model_index.json, qformer/, text_encoder/, unet/, vae/, scheduler/,
tokenizer/, image_processor/), and runs it for 3 PNDM steps (4 U-Net calls: PLMS repeats the 2nd timestep)
from fixed initial latents with classifier-free guidance.

Components:
  qformer       Blip2QFormerModel: ViT hidden 24 (2 layers, 28×28 image, patch 7), Q-Former hidden 32
                (2 layers, 4 heads, cross-attention every layer as BLIP-Diffusion), 4 query tokens;
                its BERT tokenizer is built from a tiny vocab.txt (saved as qformer/vocab.txt, [DEC] on top).
  text_encoder  ContextCLIPTextModel: hidden 32, 2 layers, 4 heads, 77 positions, tiny CLIP BPE vocab
                (tests/fixtures/tokenizers/tiny_clip, 544 tokens).
  unet          UNet2DConditionModel (16, 32) channels, CrossAttnDown + Down / Up + CrossAttnUp, cross dim 32.
  vae           AutoencoderKL (8, 16) channels, 4 latent channels, scaling_factor 0.18215.
  scheduler     PNDMScheduler as LAVIS / the conversion script build it (scaled_linear 0.00085–0.012,
                skip_prk_steps, set_alpha_to_one False, steps_offset 0).

io.safetensors:
  ref_image_u8        (31, 45, 3) uint8  the reference image (also reference.png)
  small_image_u8      (17, 20, 3) uint8  a smaller image (upscaling path of the resize)
  pixel_values        (1, 3, 28, 28)     BlipImageProcessor (diffusers: squash-resize bicubic, CLIP norm)
  pixel_values_small  (1, 3, 28, 28)     same for small_image
  lavis_pixel_values, lavis_pixel_values_small (1, 3, 28, 28)
                      LAVIS `blip_diffusion_inp_image_eval`: torchvision Resize(28, bicubic) → CenterCrop(28)
                      → ToTensor → Normalize, re-stated with PIL (torchvision is not in the pinned stack; its
                      PIL path is `img.resize(size, BICUBIC)`, crop offsets `int(round((H - h) / 2))`,
                      `ToTensor` = uint8 / 255 in float32, `Normalize` = (x − mean) / std in float32)
  query_embeds        (1, 4, 32)         Q-Former ctx embeddings
  text_embeddings     (2, 77, 32)        [uncond; cond] as fed to the U-Net
  latents0            (1, 4, 8, 8)       initial latents
  timesteps           (4,) int64
  noise_pred          (4, 1, 4, 8, 8)    guided ε per U-Net call
  latents             (4, 1, 4, 8, 8)    latents after each scheduler step
  image               (1, 3, 16, 16)     output_type="pt": (x/2 + 0.5).clamp(0, 1)
  image_u8            (1, 16, 16, 3) uint8  output_type="pil" bytes
"""
import json
import pathlib
import shutil

import numpy as np
import PIL.Image
import torch

from common import ROOT, out_dir, randomize_, save_fixture, seed

torch.set_grad_enabled(False)

PROMPT = "swimming underwater"
COND_SUBJECT = "dog"
TGT_SUBJECT = "dog"
NEG_PROMPT = "blurry, low quality"
STEPS = 3
GUIDANCE = 7.5
H = W = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def lavis_preprocess(img, size):
    """LAVIS blip_diffusion_inp_image_eval with torchvision's PIL semantics (see module docstring)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), PIL.Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)[None]


def main():
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    seed(0)
    d = out_dir("pipeline")
    for sub in d.iterdir():
        if sub.is_dir():
            shutil.rmtree(sub)
    tiny_clip = ROOT / "crates" / "blipd-models" / "tests" / "fixtures" / "tokenizers" / "tiny_clip"

    # ---------------------------------------------------------------- components
    words = "a dog cat red toy on the in sits small big bowl ##s table sofa teddy bear".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    bert_dir = d / "_bert"
    bert_dir.mkdir()
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    Q, D = 4, 32
    qcfg = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7, hidden_act="quick_gelu"),
        qformer_config=dict(vocab_size=len(vocab) + 1, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=16, cross_attention_frequency=1,
                            encoder_hidden_size=24),
        num_query_tokens=Q,
    )
    qcfg.tokenizer = str(bert_dir)
    qformer = randomize_(Blip2QFormerModel(qcfg).eval(), s=11)

    tokenizer = CLIPTokenizer(str(tiny_clip / "vocab.json"), str(tiny_clip / "merges.txt"))
    tcfg = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=D, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = randomize_(ContextCLIPTextModel(tcfg).eval(), s=12)

    unet = randomize_(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, norm_num_groups=8, attention_head_dim=(2, 4),
    ).eval(), s=13)
    vae = randomize_(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval(), s=14)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True)
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28})

    pipe = BlipDiffusionPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                                 scheduler=scheduler, qformer=qformer, image_processor=image_processor,
                                 ctx_begin_pos=2)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(d))
    (d / "qformer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    shutil.rmtree(bert_dir)
    cfg_path = d / "qformer" / "config.json"
    qc = json.loads(cfg_path.read_text())
    qc.pop("tokenizer", None)  # a temporary path; the Rust loader reads qformer/vocab.txt
    cfg_path.write_text(json.dumps(qc, indent=2, sort_keys=True))

    # ---------------------------------------------------------------- inputs
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:31, 0:45]
    base = np.stack([xx * 5, yy * 7, (xx + yy) * 3], -1)
    ref_u8 = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    small_u8 = rng.integers(0, 256, (17, 20, 3)).astype(np.uint8)
    ref = PIL.Image.fromarray(ref_u8)
    small = PIL.Image.fromarray(small_u8)
    ref.save(d / "reference.png")
    small.save(d / "small.png")
    io = {
        "ref_image_u8": torch.from_numpy(ref_u8),
        "small_image_u8": torch.from_numpy(small_u8),
        "pixel_values": image_processor.preprocess(ref, return_tensors="pt")["pixel_values"],
        "pixel_values_small": image_processor.preprocess(small, return_tensors="pt")["pixel_values"],
        "lavis_pixel_values": lavis_preprocess(ref, 28),
        "lavis_pixel_values_small": lavis_preprocess(small, 28),
    }

    # ---------------------------------------------------------------- run, recording intermediates
    rec = {"noise_pred": [], "latents": [], "timesteps": [], "text": [], "query": []}
    orig_step = pipe.scheduler.step

    def step(model_output, timestep, sample, **kw):
        out = orig_step(model_output, timestep, sample, **kw)
        rec["noise_pred"].append(model_output.clone())
        rec["latents"].append(out["prev_sample"].clone())
        rec["timesteps"].append(int(timestep))
        return out

    pipe.scheduler.step = step
    orig_unet_forward = pipe.unet.forward

    def unet_forward(sample, timestep, encoder_hidden_states, **kw):
        if not rec["text"]:
            rec["text"].append(encoder_hidden_states.clone())
        return orig_unet_forward(sample, timestep, encoder_hidden_states, **kw)

    pipe.unet.forward = unet_forward
    orig_q = pipe.get_query_embeddings

    def get_query_embeddings(image, subjects):
        q = orig_q(image, subjects)
        rec["query"].append(q.clone())
        return q

    pipe.get_query_embeddings = get_query_embeddings

    latents0 = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(42))
    image = pipe(prompt=[PROMPT], reference_image=ref, source_subject_category=[COND_SUBJECT],
                 target_subject_category=[TGT_SUBJECT], latents=latents0.clone(), guidance_scale=GUIDANCE,
                 height=H, width=W, num_inference_steps=STEPS, neg_prompt=NEG_PROMPT,
                 output_type="pt").images
    image_u8 = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    io.update({
        "query_embeds": rec["query"][0],
        "text_embeddings": rec["text"][0],
        "latents0": latents0,
        "timesteps": torch.tensor(rec["timesteps"], dtype=torch.int64),
        "noise_pred": torch.stack(rec["noise_pred"]),
        "latents": torch.stack(rec["latents"]),
        "image": image,
        "image_u8": torch.from_numpy(image_u8),
    })
    print("timesteps", rec["timesteps"], "image range", image.min().item(), image.max().item(),
          "image std", image.std().item())
    extra = {"request.json": json.dumps(dict(prompt=PROMPT, cond_subject=COND_SUBJECT, tgt_subject=TGT_SUBJECT,
                                             neg_prompt=NEG_PROMPT, steps=STEPS, guidance_scale=GUIDANCE,
                                             height=H, width=W), indent=2)}
    save_fixture("pipeline", None, None, io, extra_files=extra)


if __name__ == "__main__":
    main()
