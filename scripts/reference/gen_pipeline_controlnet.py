"""BLIP-Diffusion + ControlNet on the tiny pipeline fixture → crates/blipd-models/tests/fixtures/pipeline_controlnet
(diffusers 0.33.1 `BlipDiffusionControlNetPipeline`).

The pipeline fixture's components (tests/fixtures/pipeline, written by gen_pipeline.py) plus a tiny random
ControlNet built from its U-Net (`ControlNetModel.from_unet`, conditioning embedding (8, 16): one stride-2
block, so a 16×16 condition image meets the 8×8 latents), saved as controlnet/ (config.json + safetensors).
Run for 3 PNDM steps from fixed latents with guidance, a condition image (cond.png, 19×23, resized bicubic to
16×16 by BlipImageProcessor without normalisation) and the fixture's reference image.

io.safetensors: cond_pixels (1, 3, 16, 16) the prepared condition image (before the CFG duplication),
latents0 (1, 4, 8, 8), image (1, 3, 16, 16) output_type="pt".
"""
import json

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

from common import FIXTURES, out_dir, randomize_, save_fixture

torch.set_grad_enabled(False)


def main():
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from diffusers.pipelines.controlnet.pipeline_controlnet_blip_diffusion import BlipDiffusionControlNetPipeline
    from transformers import CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    src = FIXTURES / "pipeline"
    req = json.loads((src / "request.json").read_text())
    qcfg = Blip2Config.from_pretrained(str(src / "qformer"))
    qcfg.tokenizer = str(src / "qformer")
    qformer = Blip2QFormerModel(qcfg)
    qformer.load_state_dict(load_file(str(src / "qformer" / "model.safetensors")), strict=True)
    qformer.eval()
    text_encoder = ContextCLIPTextModel.from_pretrained(str(src / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(src / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(src / "vae")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    scheduler = PNDMScheduler.from_pretrained(str(src / "scheduler"))
    image_processor = BlipImageProcessor.from_pretrained(str(src / "image_processor"))
    controlnet = randomize_(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval(),
                            s=15)

    d = out_dir("pipeline_controlnet")
    controlnet.save_pretrained(str(d / "controlnet"), safe_serialization=True)
    pipe = BlipDiffusionControlNetPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                                           scheduler=scheduler, qformer=qformer, controlnet=controlnet,
                                           image_processor=image_processor, ctx_begin_pos=2)
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(9)
    yy, xx = np.mgrid[0:19, 0:23]
    edges = (((xx - 11) ** 2 + (yy - 9) ** 2) // 9 % 3 == 0) * 255
    cond_u8 = np.clip(np.stack([edges] * 3, -1) + rng.integers(-20, 20, (19, 23, 3)), 0, 255).astype(np.uint8)
    cond = PIL.Image.fromarray(cond_u8)
    cond.save(d / "cond.png")
    ref = PIL.Image.open(src / "reference.png").convert("RGB")
    H = W = req["height"]
    cond_pixels = pipe.prepare_control_image(cond, W, H, 1, 1, "cpu", torch.float32, False)
    latents0 = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(7))
    image = pipe(prompt=[req["prompt"]], reference_image=ref, condtioning_image=cond,
                 source_subject_category=[req["cond_subject"]], target_subject_category=[req["tgt_subject"]],
                 latents=latents0.clone(), guidance_scale=req["guidance_scale"], height=H, width=W,
                 num_inference_steps=req["steps"], neg_prompt=req["neg_prompt"], output_type="pt").images
    print("image range", image.min().item(), image.max().item(), "std", image.std().item())
    save_fixture("pipeline_controlnet", None, None,
                 {"cond_pixels": cond_pixels, "latents0": latents0, "image": image})


if __name__ == "__main__":
    main()
