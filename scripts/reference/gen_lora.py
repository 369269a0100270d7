"""LoRA on the tiny U-Net of fixtures/unet with PEFT (peft 0.21.2 + diffusers 0.33.1) → tests/fixtures/lora.

The base U-Net is fixtures/unet (written by gen_unet.py; not copied). PEFT's LoraConfig with r = 4,
lora_alpha = 8 (scale alpha/r = 2) on the attention projections that diffusers' LoRA training scripts
target (to_q, to_k, to_v, to_out.0, in attn1 and attn2 of every transformer block), added with
diffusers' `unet.add_adapter`; lora_A and lora_B given random values (PEFT initialises lora_B to zero,
which would make any loader look right).

Files:
  adapter/adapter_model.safetensors  PEFT layout (`get_peft_model_state_dict`): `<module>.lora_A.weight`
                                     (r, in) and `<module>.lora_B.weight` (out, r), alpha not applied
  adapter/adapter_config.json        PEFT's config (r, lora_alpha, target_modules, …)
  pytorch_lora_weights.safetensors   the diffusers layout that `load_lora_weights` reads: `unet.` prefix,
                                     alpha/r folded into lora_B (diffusers 0.33 stores no alpha and loads
                                     with scale 1) — checked here by loading it into a fresh U-Net with
                                     `load_lora_adapter` and comparing outputs
  io.safetensors:
    sample (2, 4, 16, 16), timesteps (2,), encoder (2, 77, 24)   the fixtures/unet inputs
    out        (2, 4, 16, 16)  the LoRA'd U-Net (PEFT, unmerged)
    out_half   (2, 4, 16, 16)  the same with the adapter at weight 0.5 (`set_adapters(weights=0.5)`)
    base_out   (2, 4, 16, 16)  without the adapter (= fixtures/unet `out`)
"""
import json

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from common import FIXTURES, out_dir, save_fixture

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
R, ALPHA = 4, 8


def base_unet():
    d = FIXTURES / "unet"
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("_class_name", None)
    unet = UNet2DConditionModel.from_config(cfg).eval()
    unet.load_state_dict(load_file(str(d / "weights.safetensors")), strict=True)
    return unet


io_in = load_file(str(FIXTURES / "unet" / "io.safetensors"))
sample, timesteps, encoder = io_in["sample"], io_in["timesteps"], io_in["encoder"]

unet = base_unet()
base_out = unet(sample, timesteps, encoder).sample
assert torch.allclose(base_out, io_in["out"], atol=1e-5), "fixtures/unet is stale: rerun gen_unet.py"

config = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS)
unet.add_adapter(config)
g = torch.Generator().manual_seed(11)
n = 0
for name, p in unet.named_parameters():
    if "lora_A" in name:
        p.data.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        n += 1
    elif "lora_B" in name:
        p.data.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
assert n == 4 * 2 * 4, f"{n} adapted projections"  # 4 transformer blocks × (attn1, attn2) × 4
out = unet(sample, timesteps, encoder).sample
unet.set_adapters(["default"], weights=[0.5])
out_half = unet(sample, timesteps, encoder).sample
unet.set_adapters(["default"], weights=[1.0])

peft_sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
d = out_dir("lora")
(d / "adapter").mkdir(exist_ok=True)
save_file(peft_sd, str(d / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
config.save_pretrained(str(d / "adapter"))

# The diffusers layout, alpha folded into lora_B; proven by loading it as diffusers does.
folded = {}
for k, v in peft_sd.items():
    folded["unet." + k] = (v * (ALPHA / R)).contiguous() if "lora_B" in k else v
save_file(folded, str(d / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
check = base_unet()
check.load_lora_adapter(str(d / "pytorch_lora_weights.safetensors"), prefix="unet")
check_out = check(sample, timesteps, encoder).sample
err = float((check_out - out).abs().max())
assert err < 1e-5, f"the diffusers-layout file does not reproduce PEFT: {err}"

save_fixture(
    "lora",
    None,
    None,
    dict(sample=sample, timesteps=timesteps, encoder=encoder, out=out, out_half=out_half, base_out=base_out),
)
print(
    "lora effect", float((out - base_out).abs().max()),
    "diffusers reload err", err,
    "keys", len(peft_sd),
)
