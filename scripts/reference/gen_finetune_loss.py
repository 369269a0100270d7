"""Subject fine-tuning loss on the tiny pipeline fixture (crates/blipd-models/tests/fixtures/pipeline)
→ fixtures/finetune_loss.

The released fine-tuning forward (LAVIS `BlipDiffusion.before_training` + `forward`, with diffusers' modules):
  ctx     = mean over the subject's photos of Blip2QFormerModel(photo, subject)        ([1, Q, D])
  latents = (posterior.mean + posterior.std · vae_noise) · 0.18215                    (VAE frozen)
  noisy   = DDPMScheduler(SD-1.5: scaled_linear 0.00085–0.012, 1000).add_noise(latents, eps, t)
  caption = "a {subject}" tokenized without padding ([BOS, a, dog, EOS]), ctx spliced after token 2
  loss    = F.mse_loss(unet(noisy, t, text_encoder(caption, ctx)).sample, eps)
"""
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common import FIXTURES, save_fixture, seed

torch.set_grad_enabled(False)

SUBJECT = "dog"
T = [33, 812]


def main():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    d = FIXTURES / "pipeline"
    qcfg = Blip2Config.from_pretrained(str(d / "qformer"))
    qcfg.tokenizer = str(d / "qformer")
    qformer = Blip2QFormerModel(qcfg)
    qformer.load_state_dict(load_file(str(d / "qformer" / "model.safetensors")), strict=True)
    qformer.eval()
    text_encoder = ContextCLIPTextModel.from_pretrained(str(d / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(d / "vae")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000)

    seed(5)
    b = len(T)
    photos = torch.randn(3, 3, 28, 28)  # three photos of the subject, CLIP-normalised
    target = torch.rand(b, 3, 16, 16) * 2 - 1
    vae_noise = torch.randn(b, 4, 8, 8)
    eps = torch.randn(b, 4, 8, 8)
    t = torch.tensor(T, dtype=torch.long)

    ctx = torch.cat([qformer(text_input=[SUBJECT], image_input=photos[i:i + 1], return_dict=False)
                     for i in range(photos.shape[0])]).mean(0, keepdim=True)
    post = vae.encode(target).latent_dist
    latents = (post.mean + post.std * vae_noise) * 0.18215
    noisy = ddpm.add_noise(latents, eps, t)
    ids = tokenizer([f"a {SUBJECT}"], padding="do_not_pad", truncation=True, max_length=77,
                    return_tensors="pt").input_ids.repeat(b, 1)
    states = text_encoder(input_ids=ids, ctx_embeddings=ctx.expand(b, -1, -1), ctx_begin_pos=[2] * b)[0]
    pred = unet(noisy, t, encoder_hidden_states=states).sample
    loss = F.mse_loss(pred, eps)
    print(f"fine-tuning loss {loss.item():.6f}; caption ids {ids[0].tolist()}")
    io = {
        "photos": photos, "target": target, "vae_noise": vae_noise, "eps": eps, "t": t,
        "ctx": ctx, "caption_ids": ids[0], "loss": loss.reshape(1),
    }
    save_fixture("finetune_loss", None, None, io)


if __name__ == "__main__":
    main()
