"""Runs one of ../shared/bench/torch_cpu.py's measurements again, as a separate process, and reports its
time and peak RSS.

torch_cpu.py builds the random-weight folder and times PyTorch in one process, so its own peak memory includes
building the networks. This loads the folder it wrote, as a user would, and runs the same work:

  infer: the same zero-shot generation from the same latents; one JSON line with load_s, generate_s,
         peak_rss_bytes and max_abs_diff against torch_cpu.py's images (same weights and latents, same images).
  train: torch_cpu.py's stage-2 step (frozen VAE encode + ViT, Q-Former -> subject embeddings at position 2 of
         the 61-token released prompt -> text encoder -> U-Net eps-MSE, AdamW lr 2e-6 wd 0.01), one warm-up step
         then --iters timed ones; one JSON line with step_s, samples_per_s, peak_rss_bytes.

vs_torch.sh runs it between two blipd runs, so that both sides are measured twice, interleaved (this machine's
speed drifts by 10-30 % over minutes).

  python torch_rss.py infer --work DIR --bert-vocab VOCAB.txt --image REF.jpg [--steps 3] [--threads 2]
  python torch_rss.py train --work DIR --bert-vocab VOCAB.txt --tokenizer CLIP_TOKENIZER_DIR [--size 256]
      [--batch 2] [--iters 3] [--threads 2]
"""
import argparse, json, os, resource, time
import numpy as np, torch
from PIL import Image
from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["infer", "train"])
ap.add_argument("--work", required=True); ap.add_argument("--bert-vocab", required=True)
ap.add_argument("--image"); ap.add_argument("--subject", default="dog"); ap.add_argument("--tokenizer")
ap.add_argument("--prompt", default="swimming underwater"); ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--size", type=int, default=256); ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)

if a.mode == "train":
    import torch.nn.functional as F
    from transformers import CLIPTokenizer
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    ck = os.path.join(a.work, "pipe")
    cfg_path = os.path.join(ck, "qformer", "config.json")
    c = json.load(open(cfg_path)); saved = c["tokenizer"]
    c["tokenizer"] = os.path.join(a.work, "_bert"); json.dump(c, open(cfg_path, "w"), indent=2)
    try:
        t0 = time.time()
        qformer = Blip2QFormerModel.from_pretrained(ck, subfolder="qformer")
        text = ContextCLIPTextModel.from_pretrained(ck, subfolder="text_encoder")
        unet = UNet2DConditionModel.from_pretrained(ck, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(ck, subfolder="vae")
        load_s = time.time() - t0
    finally:
        c["tokenizer"] = saved; json.dump(c, open(cfg_path, "w"), indent=2)
    tok = CLIPTokenizer(os.path.join(a.tokenizer, "vocab.json"), os.path.join(a.tokenizer, "merges.txt"))
    vae.requires_grad_(False); qformer.visual_encoder.requires_grad_(False)
    params = [p for m in (qformer, text, unet) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-6, weight_decay=0.01)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    B = a.batch
    p = f"a {a.subject} {a.prompt}"
    ids = tok([", ".join([p] * 20)] * B, padding="max_length", truncation=True, max_length=61,
              return_tensors="pt").input_ids

    def step():
        ref = torch.randn(B, 3, 224, 224); tgt = torch.randn(B, 3, a.size, a.size)
        with torch.no_grad():
            lat = vae.encode(tgt).latent_dist.sample() * 0.18215
        noise = torch.randn_like(lat); t = torch.randint(0, 1000, (B,))
        ctx = qformer(image_input=ref, text_input=[a.subject] * B, return_dict=False)
        cond = text(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[2] * B)[0]
        loss = F.mse_loss(unet(ddpm.add_noise(lat, noise, t), t, cond).sample, noise)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    step()
    t0 = time.time()
    for _ in range(a.iters):
        step()
    dt = (time.time() - t0) / a.iters
    print(json.dumps({"load_s": round(load_s, 2), "step_s": round(dt, 3), "samples_per_s": round(B / dt, 4),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    raise SystemExit(0)
ck = os.path.join(a.work, "pipe")
cfg_path = os.path.join(ck, "qformer", "config.json")
c = json.load(open(cfg_path)); saved = c["tokenizer"]
bert = os.path.join(a.work, "_bert")
c["tokenizer"] = bert; json.dump(c, open(cfg_path, "w"), indent=2)
try:
    t0 = time.time(); pipe = BlipDiffusionPipeline.from_pretrained(ck).to(torch.float32); load_s = time.time() - t0
finally:
    c["tokenizer"] = saved; json.dump(c, open(cfg_path, "w"), indent=2)
lat = torch.from_numpy(np.load(os.path.join(a.work, "latents_in.npy")))
ref = Image.open(a.image).convert("RGB")
with torch.no_grad():
    size = lat.shape[-1] * 8
    t0 = time.time()
    img = pipe(prompt=[a.prompt], reference_image=ref, source_subject_category=[a.subject],
               target_subject_category=[a.subject], latents=lat.clone(), guidance_scale=7.5, height=size,
               width=size, num_inference_steps=a.steps, neg_prompt="", output_type="np").images
    gen_s = time.time() - t0
prev = np.load(os.path.join(a.work, f"generate_{a.steps}steps.npy"))
res = {"load_s": round(load_s, 2), "generate_s": round(gen_s, 2),
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "max_abs_diff": float(np.abs(img - prev).max())}
print(json.dumps(res), flush=True)
