"""Stage-2 loss on the tiny pipeline fixture (crates/blipd-models/tests/fixtures/pipeline) → fixtures/stage2_loss.

The loss of BLIP-Diffusion's released training forward (LAVIS `BlipDiffusion.forward`, here with diffusers'
modules and the inference prompt template, since stage 2 trains on the same prompts it is used with):
  latents = (posterior.mean + posterior.std · vae_noise) · 0.18215         (VAE frozen)
  noisy   = DDPMScheduler(SD-1.5: scaled_linear 0.00085–0.012, 1000).add_noise(latents, eps, t)
  ctx     = Blip2QFormerModel(subject image, subject class)                 (eval: no dropout)
  prompt  = ", ".join(["a {subject} {caption}"] * 20) → 77 − Q tokens, ctx spliced after token 2;
            a dropped sample (keep = 0) gets its caption alone, 77 tokens, no ctx
  loss    = F.mse_loss(unet(noisy, t, text).sample, eps)
Inputs and the loss go to io.safetensors; the weights are the pipeline fixture's.
"""
import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common import FIXTURES, save_fixture, seed

torch.set_grad_enabled(False)

SUBJECTS = ["dog", "cat"]
CAPTIONS = ["a dog sits on the sofa", "a red toy on the table"]
KEEP = [1, 0]
T = [17, 640]


def main():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    d = FIXTURES / "pipeline"
    qcfg = Blip2Config.from_pretrained(str(d / "qformer"))
    qcfg.tokenizer = str(d / "qformer")  # holds vocab.txt
    qformer = Blip2QFormerModel(qcfg)
    qformer.load_state_dict(load_file(str(d / "qformer" / "model.safetensors")), strict=True)
    qformer.eval()
    text_encoder = ContextCLIPTextModel.from_pretrained(str(d / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(d / "vae")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000)

    seed(3)
    b, q = len(SUBJECTS), qcfg.num_query_tokens
    pixel_values = torch.randn(b, 3, 28, 28)
    target = torch.rand(b, 3, 16, 16) * 2 - 1
    vae_noise = torch.randn(b, 4, 8, 8)
    eps = torch.randn(b, 4, 8, 8)
    t = torch.tensor(T, dtype=torch.long)

    post = vae.encode(target).latent_dist
    latents = (post.mean + post.std * vae_noise) * 0.18215
    noisy = ddpm.add_noise(latents, eps, t)
    ctx = qformer(text_input=SUBJECTS, image_input=pixel_values, return_dict=False)
    states = []
    for i in range(b):
        if KEEP[i]:
            text = ", ".join([f"a {SUBJECTS[i]} {CAPTIONS[i].strip()}"] * 20)
            ids = tokenizer([text], padding="max_length", truncation=True, max_length=77 - q,
                            return_tensors="pt").input_ids
            h = text_encoder(input_ids=ids, ctx_embeddings=ctx[i:i + 1], ctx_begin_pos=[2])[0]
        else:
            ids = tokenizer([CAPTIONS[i].strip()], padding="max_length", truncation=True, max_length=77,
                            return_tensors="pt").input_ids
            h = text_encoder(input_ids=ids, ctx_embeddings=None)[0]
        states.append(h)
    states = torch.cat(states, 0)
    pred = unet(noisy, t, encoder_hidden_states=states).sample
    loss = F.mse_loss(pred, eps)
    print(f"stage-2 loss {loss.item():.6f}")
    io = {
        "pixel_values": pixel_values, "target": target, "vae_noise": vae_noise, "eps": eps,
        "t": t, "keep": torch.tensor(KEEP), "ctx": ctx, "text_states": states, "pred": pred,
        "loss": loss.reshape(1),
    }
    extra = {"request.json": json.dumps({"subjects": SUBJECTS, "captions": CAPTIONS}, indent=2)}
    save_fixture("stage2_loss", None, None, io, extra_files=extra)


if __name__ == "__main__":
    main()
