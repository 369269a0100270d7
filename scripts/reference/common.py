"""Shared helpers for the reference fixture generators.

Each generator builds a tiny random-weight reference model with a fixed seed, runs it on fixed inputs and
writes, under crates/blipd-models/tests/fixtures/<name>/:
  config.json          the reference config (what from_pretrained would read)
  weights.safetensors  the reference state dict, in the reference key layout
  io.safetensors       inputs and outputs (float32)
"""
import json
import os
import pathlib

import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "blipd-models" / "tests" / "fixtures"

torch.set_grad_enabled(False)


def out_dir(name):
    d = FIXTURES / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _clean(sd):
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_fixture(name, config, state_dict, io, extra_files=None):
    d = out_dir(name)
    if config is not None:
        with open(d / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
    if state_dict is not None:
        save_file(_clean(state_dict), str(d / "weights.safetensors"), metadata={"format": "pt"})
    save_file(_clean(io), str(d / "io.safetensors"))
    for fname, content in (extra_files or {}).items():
        with open(d / fname, "w") as f:
            f.write(content)
    size = sum(p.stat().st_size for p in d.iterdir())
    print(f"{name}: {len(state_dict or {})} tensors, {size / 1024:.0f} KiB in {d.relative_to(ROOT)}")


def seed(s=0):
    torch.manual_seed(s)


def randomize_(module, std=0.02, s=0):
    """Give every parameter (norms included) non-trivial random values so parity tests can fail."""
    g = torch.Generator().manual_seed(s)
    for name, p in module.named_parameters():
        if name.endswith("weight") and p.ndim == 1:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
    return module


def load_pipeline_parts():
    """The networks and tokenizer of the tiny BLIP-Diffusion fixture (fixtures/pipeline, written by
    gen_pipeline.py), loaded as diffusers/transformers load them, in eval mode: a dict with qformer,
    text_encoder, unet, vae, tokenizer, and `dir` (the folder, for its scheduler/ and image_processor/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    d = FIXTURES / "pipeline"
    qcfg = Blip2Config.from_pretrained(str(d / "qformer"))
    qcfg.tokenizer = str(d / "qformer")  # holds vocab.txt
    qformer = Blip2QFormerModel(qcfg)
    qformer.load_state_dict(load_file(str(d / "qformer" / "model.safetensors")), strict=True)
    return {
        "dir": d,
        "qformer": qformer.eval(),
        "text_encoder": ContextCLIPTextModel.from_pretrained(str(d / "text_encoder")).eval(),
        "unet": UNet2DConditionModel.from_pretrained(str(d / "unet")).eval(),
        "vae": AutoencoderKL.from_pretrained(str(d / "vae")).eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(str(d / "tokenizer")),
    }
