"""CLIPSeg masks, transformers side of scripts/bench/clipseg.sh (transformers 4.44.2, CPU).

  prepare WORK N WxH   a random-weight CLIPSegForImageSegmentation at the real rd64-refined size (150.7 M
                       parameters; gen_clipseg_masks.full_size's config and tiny tokenizer) in WORK/model,
                       N procedural photos WORK/images/<id>.png of WxH, WORK/subjects.csv naming them
  time WORK BATCH      the whole job as `blipd data masks --source clipseg` does it: read each photo, the
                       processor (352², ImageNet normalisation, the class name as the prompt), the model in
                       batches of BATCH, sigmoid, bilinear resize to the photo's size, 16-bit grey PNG in
                       WORK/torch_masks; prints wall seconds and the model's share. DEVICE=cuda runs the model
                       (and the resize) on the GPU, as blipd's CUDA build does (default cpu)
  compare WORK         max and mean |Δ| of blipd's masks (WORK/blipd_masks) against transformers', in [0, 1]
"""
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "reference"))

CLASSES = ["dog", "cat", "teapot", "backpack", "vase", "clock", "sneaker", "bear"]


def prepare(work, n, size):
    import gen_clipseg_masks as g
    from common import seed

    seed(0)
    work = pathlib.Path(work)
    w, h = (int(v) for v in size.split("x"))
    model_dir = work / "model"
    model = g.full_size_model()
    model.save_pretrained(model_dir, safe_serialization=True)
    g.save_processor(model_dir)
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rows = ["ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax"]
    for i in range(n):
        image_id = f"{0xb0000000 + i:016x}"
        # A smooth background and an ellipse of another colour: an image with structure.
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        inside = ((xx - cx) / (0.25 * w)) ** 2 + ((yy - cy) / (0.3 * h)) ** 2 < 1
        img = c0 * (0.6 + 0.4 * xx[..., None] / w) * np.ones(3)
        img[inside] = c1
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(img_dir / f"{image_id}.png")
        rows.append(f"{image_id},/m/0x,{CLASSES[i % len(CLASSES)]},0.2,0.8,0.2,0.8")
    (work / "subjects.csv").write_text("\n".join(rows) + "\n")
    print(f"prepared {n} images of {w}×{h} and a {sum(p.numel() for p in model.parameters())}-parameter model in {work}")


def run(work, batch):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    torch.set_num_threads(os.cpu_count())
    torch.set_grad_enabled(False)
    work = pathlib.Path(work)
    out = work / "torch_masks"
    out.mkdir(exist_ok=True)
    device = torch.device(os.environ.get("DEVICE", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    processor = CLIPSegProcessor.from_pretrained(work / "model")
    model = CLIPSegForImageSegmentation.from_pretrained(work / "model").eval().to(device)
    rows = [l.split(",") for l in (work / "subjects.csv").read_text().splitlines()[1:]]
    t0 = time.perf_counter()
    model_s = 0.0
    for b0 in range(0, len(rows), batch):
        chunk = rows[b0 : b0 + batch]
        images = [Image.open(work / "images" / f"{r[0]}.png").convert("RGB") for r in chunk]
        inputs = processor(text=[r[2] for r in chunk], images=images, padding=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        t = time.perf_counter()
        logits = model(**inputs).logits
        if logits.dim() == 2:
            logits = logits[None]
        sync()
        model_s += time.perf_counter() - t
        for r, im, lg in zip(chunk, images, logits):
            m = torch.sigmoid(F.interpolate(lg[None, None], size=(im.height, im.width), mode="bilinear",
                                            align_corners=False))[0, 0]
            u16 = (m.clamp(0, 1) * 65535.0).round().to(torch.int32).cpu().numpy().astype(np.uint16)
            Image.fromarray(u16).save(out / f"{r[0]}.png")
    wall = time.perf_counter() - t0
    n = len(rows)
    print(f"transformers: {n} images in {wall:.2f} s = {n / wall:.2f} images/s (model {model_s:.2f} s = "
          f"{n / model_s:.2f} images/s), {device}, {torch.get_num_threads()} threads")
    print(f"RESULT torch_s={wall:.4f} torch_model_s={model_s:.4f}")


def compare(work):
    work = pathlib.Path(work)
    worst, total, count = 0.0, 0.0, 0
    for p in sorted((work / "torch_masks").glob("*.png")):
        a = np.asarray(Image.open(p), dtype=np.float64) / 65535.0
        b = np.asarray(Image.open(work / "blipd_masks" / p.name), dtype=np.float64) / 65535.0
        assert a.shape == b.shape, (p.name, a.shape, b.shape)
        d = np.abs(a - b)
        worst, total, count = max(worst, float(d.max())), total + float(d.sum()), count + d.size
    print(f"masks: max |Δ| {worst:.2e}, mean |Δ| {total / count:.2e} over {count} pixels")
    print(f"RESULT max_abs={worst:.3e}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif cmd == "time":
        run(sys.argv[2], int(sys.argv[3]))
    elif cmd == "compare":
        compare(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
