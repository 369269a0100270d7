"""Runs one of ../shared/bench/torch_cpu.py's measurements as a separate process and reports its peak RSS.

torch_cpu.py builds the random-weight folder and times PyTorch in one process, so its own peak memory includes
building the networks. This loads the folder it wrote, as a user would, runs the same zero-shot generation from
the same latents, and prints one JSON line: load_s, generate_s, peak_rss_bytes, max_abs_diff against
torch_cpu.py's images (the same weights and latents must give the same images).

  python torch_rss.py infer --work DIR --bert-vocab VOCAB.txt --image REF.jpg [--steps 3] [--threads 2]
"""
import argparse, json, os, resource, time
import numpy as np, torch
from PIL import Image
from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["infer"])
ap.add_argument("--work", required=True); ap.add_argument("--bert-vocab", required=True)
ap.add_argument("--image", required=True); ap.add_argument("--subject", default="dog")
ap.add_argument("--prompt", default="swimming underwater"); ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
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
