"""BLIP-Diffusion with DDIM on the tiny pipeline fixture → crates/blipd-models/tests/fixtures/pipeline_ddim
(diffusers 0.33.1 `BlipDiffusionPipeline` with `DDIMScheduler.from_config` of the fixture's PNDM scheduler
config, as LAVIS builds its DDIM sampler from SD-1.5's; η = 0).

The pipeline fixture (tests/fixtures/pipeline, written by gen_pipeline.py) and its request.json, 3 DDIM steps
from fixed latents with guidance.

io.safetensors: latents0 (1, 4, 8, 8), image (1, 3, 16, 16) output_type="pt".
"""
import json

import PIL.Image
import torch
from common import load_pipeline_parts, save_fixture

torch.set_grad_enabled(False)


def main():
    from diffusers import DDIMScheduler
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.pipeline_blip_diffusion import BlipDiffusionPipeline

    parts = load_pipeline_parts()
    src = parts.pop("dir")
    req = json.loads((src / "request.json").read_text())
    scheduler = DDIMScheduler.from_pretrained(str(src / "scheduler"))
    image_processor = BlipImageProcessor.from_pretrained(str(src / "image_processor"))
    pipe = BlipDiffusionPipeline(**parts, scheduler=scheduler, image_processor=image_processor, ctx_begin_pos=2)
    pipe.set_progress_bar_config(disable=True)
    ref = PIL.Image.open(src / "reference.png").convert("RGB")
    H = W = req["height"]
    latents0 = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(11))
    image = pipe(prompt=[req["prompt"]], reference_image=ref, source_subject_category=[req["cond_subject"]],
                 target_subject_category=[req["tgt_subject"]], latents=latents0.clone(),
                 guidance_scale=req["guidance_scale"], height=H, width=W, num_inference_steps=req["steps"],
                 neg_prompt=req["neg_prompt"], output_type="pt").images
    print("scheduler", dict(scheduler.config), "timesteps", scheduler.timesteps.tolist())
    print("image range", image.min().item(), image.max().item(), "std", image.std().item())
    save_fixture("pipeline_ddim", None, None, {"latents0": latents0, "image": image})


if __name__ == "__main__":
    main()
