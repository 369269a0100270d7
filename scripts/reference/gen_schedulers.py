"""Scheduler parity fixtures (diffusers 0.33.1 DDPMScheduler / PNDMScheduler / DDIMScheduler, and LAVIS's
DDIM inversion step, re-stated here from `BlipDiffusion._noise_latent_step`).

Writes crates/blipd-models/tests/fixtures/schedulers/:
  <name>.json         scheduler configs as diffusers serialises them (read back by the Rust test)
  io.safetensors      timestep lists (int64), betas / alphas_cumprod, add_noise / get_velocity outputs,
                      step sequences on small random tensors with fixed fake model outputs.
"""
import json

import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from common import out_dir, save_fixture, seed

torch.set_grad_enabled(False)

# runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# What LAVIS / the diffusers conversion script build for BLIP-Diffusion inference.
BLIP = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
            skip_prk_steps=True)

io = {}
configs = {}


def add_config(name, sched):
    configs[name] = json.loads(sched.to_json_string())


def ts(key, sched, n):
    sched.set_timesteps(n)
    io[key] = sched.timesteps.to(torch.int64).clone()


seed(0)
shape = (2, 4, 5, 5)

# ---------------------------------------------------------------- configs (file round trip)
pndm_blip = PNDMScheduler(**BLIP)
pndm_sd15 = PNDMScheduler.from_config(SD15)
pndm_prk = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
pndm_linspace = PNDMScheduler(**BLIP, timestep_spacing="linspace")
pndm_trailing = PNDMScheduler(**BLIP, timestep_spacing="trailing")
pndm_v = PNDMScheduler(**BLIP, prediction_type="v_prediction", steps_offset=1)
ddim_sd15 = DDIMScheduler.from_config(SD15)
ddim_default = DDIMScheduler()  # linear betas, clip_sample, set_alpha_to_one
ddim_linspace = DDIMScheduler.from_config(SD15, timestep_spacing="linspace")
ddim_trailing = DDIMScheduler.from_config(SD15, timestep_spacing="trailing", steps_offset=0)
ddim_v = DDIMScheduler.from_config(SD15, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing", steps_offset=0)
ddpm_sd15 = DDPMScheduler.from_config(SD15)
ddpm_default = DDPMScheduler()
ddpm_cos = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large",
                         prediction_type="v_prediction")
ddpm_sigmoid = DDPMScheduler(beta_schedule="sigmoid", variance_type="fixed_small_log")
for name, s in [("pndm_blip", pndm_blip), ("pndm_sd15", pndm_sd15), ("pndm_prk", pndm_prk),
                ("pndm_linspace", pndm_linspace), ("pndm_trailing", pndm_trailing), ("pndm_v", pndm_v),
                ("ddim_sd15", ddim_sd15), ("ddim_default", ddim_default), ("ddim_linspace", ddim_linspace),
                ("ddim_trailing", ddim_trailing), ("ddim_v", ddim_v), ("ddpm_sd15", ddpm_sd15),
                ("ddpm_default", ddpm_default), ("ddpm_cos", ddpm_cos), ("ddpm_sigmoid", ddpm_sigmoid)]:
    add_config(name, s)
    io[f"{name}/betas"] = s.betas.clone()
    io[f"{name}/alphas_cumprod"] = s.alphas_cumprod.clone()

# ---------------------------------------------------------------- timestep lists
NS = [1, 2, 3, 4, 7, 25, 50, 100, 999, 1000]
for name in ["pndm_blip", "pndm_sd15", "pndm_prk", "pndm_linspace", "pndm_trailing",
             "ddim_sd15", "ddim_default", "ddim_linspace", "ddim_trailing", "ddpm_sd15"]:
    s = {"pndm_blip": pndm_blip, "pndm_sd15": pndm_sd15, "pndm_prk": pndm_prk, "pndm_linspace": pndm_linspace,
         "pndm_trailing": pndm_trailing, "ddim_sd15": ddim_sd15, "ddim_default": ddim_default,
         "ddim_linspace": ddim_linspace, "ddim_trailing": ddim_trailing, "ddpm_sd15": ddpm_sd15}[name]
    for n in NS:
        if name == "pndm_prk" and n < 4:
            continue  # PRK needs ≥ 4 grid points
        ts(f"{name}/timesteps/{n}", s, n)

# ---------------------------------------------------------------- add_noise / get_velocity
x0 = torch.randn(3, 4, 5, 5)
eps = torch.randn(3, 4, 5, 5)
t = torch.tensor([0, 517, 999], dtype=torch.int64)
io["noise/x0"], io["noise/eps"], io["noise/t"] = x0, eps, t
for name, s in [("ddpm_sd15", ddpm_sd15), ("ddpm_cos", ddpm_cos), ("ddim_v", ddim_v)]:
    io[f"{name}/add_noise"] = s.add_noise(x0, eps, t)
    io[f"{name}/velocity"] = s.get_velocity(x0, eps, t)


# ---------------------------------------------------------------- step sequences
def sequence(key, sched, n, step_fn):
    """Run the scheduler over its timesteps on a fixed random sample with fixed fake model outputs
    (a random tensor per call, mixed with the current sample so errors propagate)."""
    sched.set_timesteps(n)
    timesteps = sched.timesteps.tolist()
    sample = torch.randn(shape)
    io[f"{key}/sample0"] = sample.clone()
    outs, eps_list, extras = [], [], []
    for i, tt in enumerate(timesteps):
        e = 0.3 * sample + torch.randn(shape)
        eps_list.append(e)
        sample, extra = step_fn(sched, e, tt, sample, i)
        outs.append(sample.clone())
        if extra is not None:
            extras.append(extra)
    io[f"{key}/timesteps"] = torch.tensor(timesteps, dtype=torch.int64)
    io[f"{key}/model_outputs"] = torch.stack(eps_list)
    io[f"{key}/samples"] = torch.stack(outs)
    if extras:
        io[f"{key}/extras"] = torch.stack(extras)


def pndm_step(s, e, t, x, i):
    return s.step(e, t, x).prev_sample, None


def ddim_step(s, e, t, x, i):
    out = s.step(e, t, x, eta=0.0)
    return out.prev_sample, out.pred_original_sample


def ddim_eta_step(s, e, t, x, i):
    noise = torch.randn(shape)
    out = s.step(e, t, x, eta=0.7, variance_noise=noise)
    return out.prev_sample, noise


def ddim_clipped_step(s, e, t, x, i):
    noise = torch.randn(shape)
    out = s.step(e, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=noise)
    return out.prev_sample, noise


def ddpm_step(s, e, t, x, i):
    g = torch.Generator().manual_seed(100 + i)
    out = s.step(e, t, x, generator=g)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
    return out.prev_sample, noise


def lavis_inversion_step(s, e, t, x, i):
    """LAVIS BlipDiffusion._noise_latent_step after the U-Net (guidance 1), verbatim arithmetic."""
    prev_timestep = t - s.config.num_train_timesteps // s.num_inference_steps
    alpha_prod_t = s.alphas_cumprod[t]
    alpha_prod_t_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
    alpha_prod_t, alpha_prod_t_prev = alpha_prod_t_prev, alpha_prod_t
    alpha_t, alpha_tm1 = alpha_prod_t, alpha_prod_t_prev
    out = alpha_tm1**0.5 * ((alpha_t**-0.5 - alpha_tm1**-0.5) * x
                            + ((1 / alpha_tm1 - 1) ** 0.5 - (1 / alpha_t - 1) ** 0.5) * e) + x
    return out, None


class Inverted:
    """Iterate a DDIM scheduler's timesteps in reverse, as LAVIS's `reversed(scheduler.timesteps)`."""

    def __init__(self, s):
        self.s = s
        self.config = s.config

    def set_timesteps(self, n):
        self.s.set_timesteps(n)
        self.num_inference_steps = n
        self.alphas_cumprod = self.s.alphas_cumprod
        self.final_alpha_cumprod = self.s.final_alpha_cumprod
        self.timesteps = self.s.timesteps.flip(0)


sequence("plms_blip", PNDMScheduler(**BLIP), 10, pndm_step)            # 11 calls: Heun pair, AB2..AB4
sequence("plms_sd15", PNDMScheduler.from_config(SD15), 7, pndm_step)
sequence("plms_v", PNDMScheduler(**BLIP, prediction_type="v_prediction", steps_offset=1), 6, pndm_step)
sequence("prk", PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"), 10,
         pndm_step)                                                    # 12 PRK + 7 PLMS
sequence("ddim_sd15", DDIMScheduler.from_config(SD15), 10, ddim_step)
sequence("ddim_default", DDIMScheduler(), 8, ddim_step)                # clip_sample, set_alpha_to_one
sequence("ddim_eta", DDIMScheduler.from_config(SD15), 8, ddim_eta_step)
sequence("ddim_clipped", DDIMScheduler(), 6, ddim_clipped_step)
sequence("ddim_v", DDIMScheduler.from_config(SD15, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                              timestep_spacing="trailing", steps_offset=0), 6, ddim_step)
sequence("ddim_inversion", Inverted(DDIMScheduler.from_config(SD15)), 10, lavis_inversion_step)
sequence("ddpm_sd15", DDPMScheduler.from_config(SD15), 8, ddpm_step)
sequence("ddpm_cos", DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large",
                                   prediction_type="v_prediction"), 6, ddpm_step)
sequence("ddpm_sigmoid", DDPMScheduler(beta_schedule="sigmoid", variance_type="fixed_small_log"), 6, ddpm_step)

extra = {f"{name}.json": json.dumps(cfg, indent=2, sort_keys=True) for name, cfg in configs.items()}
extra["sd15_scheduler_config.json"] = json.dumps(SD15, indent=2)
io = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in io.items()}
save_fixture("schedulers", None, None, io, extra_files=extra)
print(f"{len(io)} io tensors")
