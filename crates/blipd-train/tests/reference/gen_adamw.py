"""Reference for tests/adamw_parity.rs: torch.optim.AdamW + clip_grad_norm_ on three tensors.

Run from the repo root:  /work/pyref/bin/python crates/blipd-train/tests/reference/gen_adamw.py
Writes crates/blipd-train/tests/fixtures/adamw_torch.json.

Parameter groups follow LAVIS: weight decay on ndim >= 2 tensors only. The learning rate
changes every step (as a schedule would), gradients are random and large enough that
clipping to max_norm=0.5 is active on some steps and not on others.
"""
import json
import os

import torch

torch.manual_seed(0)
shapes = {"w": (3, 4), "b": (4,), "t": (2, 2, 3)}
params = {k: torch.nn.Parameter(torch.randn(s) * 0.5) for k, s in shapes.items()}
init = {k: p.detach().clone() for k, p in params.items()}
decay = [params["w"], params["t"]]
no_decay = [params["b"]]
opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
    lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
)
steps = []
lrs = [1e-2, 2e-2, 3e-2, 1.5e-2, 5e-3, 2.5e-2]
scales = [0.05, 1.0, 0.1, 2.0, 0.02, 0.7]
for lr, scale in zip(lrs, scales):
    grads = {k: torch.randn(s) * scale for k, s in shapes.items()}
    for k, p in params.items():
        p.grad = grads[k].clone()
    total = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=0.5)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    steps.append({
        "lr": lr,
        "grads": {k: g.flatten().tolist() for k, g in grads.items()},
        "total_norm": float(total),
        "after": {k: p.detach().flatten().tolist() for k, p in params.items()},
    })

out = {
    "torch": torch.__version__,
    "max_norm": 0.5,
    "weight_decay": 0.05,
    "shapes": {k: list(s) for k, s in shapes.items()},
    "init": {k: v.flatten().tolist() for k, v in init.items()},
    "steps": steps,
}
path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adamw_torch.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", os.path.normpath(path))
