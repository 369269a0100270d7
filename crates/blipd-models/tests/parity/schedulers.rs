//! Scheduler parity against diffusers 0.33.1 (`scripts/reference/gen_schedulers.py`): configs read
//! from the `scheduler_config.json` files diffusers wrote, β / ᾱ tables, timestep lists (identical),
//! `add_noise` / `get_velocity`, and step sequences (PLMS with the duplicated timestep and AB2–AB4,
//! PRK, DDIM η = 0 / η > 0 / clipped / v-prediction, LAVIS DDIM inversion, DDPM ancestral).

use std::path::PathBuf;

use blipd_models::schedulers::{
    DdimScheduler, DdimSchedulerConfig, DdpmScheduler, DdpmSchedulerConfig, PndmScheduler,
    PndmSchedulerConfig, PredictionType,
};
use blipd_models::weights::StateDict;
use burn::prelude::*;

use super::common::{assert_close, device, fixture_dir, int_tensor, io, tensor, B};

const NAME: &str = "schedulers";
/// f32 step sequences: max-abs tolerance from the task (`≤ 1e-5`).
const STEP_TOL: f32 = 1e-5;

fn cfg(name: &str) -> PathBuf {
    fixture_dir(NAME).join(format!("{name}.json"))
}

fn ints(sd: &StateDict, key: &str) -> Vec<usize> {
    sd.data(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| usize::try_from(t).expect("non-negative timestep"))
        .collect()
}

fn floats(sd: &StateDict, key: &str) -> Vec<f32> {
    sd.data(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

/// Max-abs difference and number of bit-different entries of two f32 tables.
fn table_diff(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    // Panics on a length mismatch, NaN or infinity (a running max would skip a NaN).
    let worst = blipd_testkit::max_abs_diff(ours, reference) as f32;
    let differ = ours
        .iter()
        .zip(reference)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    println!(
        "parity {what}: max-abs {worst:.3e}, {differ}/{} entries not bit-identical",
        ours.len()
    );
    assert!(worst <= tol, "{what}: max-abs {worst:e} > {tol:e}");
}

enum Any {
    Pndm(Box<PndmScheduler<B>>),
    Ddim(DdimScheduler),
    Ddpm(DdpmScheduler),
}

fn load(name: &str) -> Any {
    let p = cfg(name);
    if name.starts_with("pndm") {
        Any::Pndm(Box::new(PndmScheduler::from_config_file(&p).unwrap()))
    } else if name.starts_with("ddim") {
        Any::Ddim(DdimScheduler::from_config_file(&p).unwrap())
    } else {
        Any::Ddpm(DdpmScheduler::from_config_file(&p).unwrap())
    }
}

const CONFIGS: &[&str] = &[
    "pndm_blip",
    "pndm_sd15",
    "pndm_prk",
    "pndm_linspace",
    "pndm_trailing",
    "pndm_v",
    "ddim_sd15",
    "ddim_default",
    "ddim_linspace",
    "ddim_trailing",
    "ddim_v",
    "ddpm_sd15",
    "ddpm_default",
    "ddpm_cos",
    "ddpm_sigmoid",
];

#[test]
fn presets_equal_the_reference_configs() {
    let sd15 = fixture_dir(NAME).join("sd15_scheduler_config.json");
    assert_eq!(
        PndmSchedulerConfig::from_file(&cfg("pndm_blip")).unwrap(),
        PndmSchedulerConfig::blip_diffusion()
    );
    assert_eq!(
        PndmSchedulerConfig::from_file(&sd15).unwrap(),
        PndmSchedulerConfig::sd15()
    );
    assert_eq!(
        DdimSchedulerConfig::from_file(&sd15).unwrap(),
        DdimSchedulerConfig::sd15()
    );
    assert_eq!(
        DdimSchedulerConfig::from_file(&cfg("ddim_sd15")).unwrap(),
        DdimSchedulerConfig::sd15()
    );
    assert_eq!(
        DdpmSchedulerConfig::from_file(&sd15).unwrap(),
        DdpmSchedulerConfig::sd15()
    );
    assert_eq!(
        DdpmSchedulerConfig::from_file(&cfg("ddpm_sd15")).unwrap(),
        DdpmSchedulerConfig::sd15()
    );
}

#[test]
fn betas_and_alphas_cumprod() {
    let sd = io(NAME);
    for &name in CONFIGS {
        let schedule = match load(name) {
            Any::Pndm(s) => s.schedule().clone(),
            Any::Ddim(s) => s.schedule().clone(),
            Any::Ddpm(s) => s.schedule().clone(),
        };
        // linear / scaled_linear / cosine reproduce torch bit for bit; sigmoid goes through exp,
        // which may differ by an ulp.
        // torch's CPU `Tensor.sqrt` (MKL VML on this build) is not correctly rounded, so the
        // zero-terminal-SNR rescale (`ddim_v`) differs by ulps where ᾱ → 0 (β up to ~3e-6).
        let tol = match name {
            "ddpm_sigmoid" => 1e-7,
            "ddim_v" => 5e-6,
            _ => 0.0,
        };
        table_diff(
            &format!("{name} betas"),
            &schedule.betas,
            &floats(&sd, &format!("{name}/betas")),
            tol,
        );
        table_diff(
            &format!("{name} alphas_cumprod"),
            &schedule.alphas_cumprod,
            &floats(&sd, &format!("{name}/alphas_cumprod")),
            tol,
        );
    }
}

#[test]
fn timestep_lists_are_identical() {
    let sd = io(NAME);
    let (mut checked, mut rejected) = (0, 0);
    for &name in CONFIGS {
        for key in sd
            .keys()
            .filter(|k| k.starts_with(&format!("{name}/timesteps/")))
        {
            let n: usize = key.rsplit('/').next().unwrap().parse().unwrap();
            let ours = match load(name) {
                Any::Pndm(mut s) => s.set_timesteps(n).map(|_| s.timesteps().to_vec()),
                Any::Ddim(mut s) => s.set_timesteps(n).map(|_| s.timesteps().to_vec()),
                Any::Ddpm(mut s) => s.set_timesteps(n).map(|_| s.timesteps().to_vec()),
            };
            let reference = ints(&sd, key);
            if reference.iter().any(|&t| t >= 1000) {
                // diffusers lists t = 1000 for N = 1000 with steps_offset 1 and fails later when
                // indexing ᾱ; we refuse at set_timesteps.
                assert!(ours.is_err(), "{key}: expected an out-of-range error");
                rejected += 1;
                continue;
            }
            assert_eq!(ours.unwrap(), reference, "{key}");
            checked += 1;
        }
    }
    println!(
        "parity scheduler timesteps: {checked} lists identical, {rejected} out-of-range lists rejected"
    );
    assert!(
        checked >= 80,
        "only {checked} timestep lists in the fixture"
    );

    // The documented BLIP-Diffusion list.
    let mut s = PndmScheduler::<B>::blip_diffusion();
    s.set_timesteps(50).unwrap();
    assert_eq!(&s.timesteps()[..4], &[980, 960, 960, 940]);
}

#[test]
fn add_noise_and_velocity() {
    let sd = io(NAME);
    let x0 = tensor::<4>(&sd, "noise/x0");
    let eps = tensor::<4>(&sd, "noise/eps");
    let t = int_tensor::<1>(&sd, "noise/t");
    for name in ["ddpm_sd15", "ddpm_cos", "ddim_v"] {
        let schedule = match load(name) {
            Any::Ddim(s) => s.schedule().clone(),
            Any::Ddpm(s) => s.schedule().clone(),
            Any::Pndm(_) => unreachable!(),
        };
        let noisy = schedule.add_noise(x0.clone(), eps.clone(), t.clone());
        assert_close(
            &format!("{name} add_noise"),
            noisy,
            tensor(&sd, &format!("{name}/add_noise")),
            1e-6,
        );
        let v = schedule.get_velocity(x0.clone(), eps.clone(), t.clone());
        assert_close(
            &format!("{name} get_velocity"),
            v,
            tensor(&sd, &format!("{name}/velocity")),
            1e-6,
        );
    }
    // training_target follows prediction_type.
    let cos = DdpmScheduler::from_config_file(&cfg("ddpm_cos")).unwrap();
    assert_eq!(cos.config().prediction_type, PredictionType::VPrediction);
    assert_close(
        "ddpm_cos training_target (v)",
        cos.training_target(x0.clone(), eps.clone(), t.clone()),
        tensor(&sd, "ddpm_cos/velocity"),
        1e-6,
    );
}

/// One sequence of the fixture: initial sample, per-call model outputs, reference samples after each
/// call, optional per-call extras (noise) and the timesteps.
struct Seq {
    timesteps: Vec<usize>,
    sample0: Tensor<B, 4>,
    model_outputs: Tensor<B, 5>,
    samples: Tensor<B, 5>,
    extras: Option<Tensor<B, 5>>,
}

impl Seq {
    fn load(sd: &StateDict, key: &str) -> Self {
        Self {
            timesteps: ints(sd, &format!("{key}/timesteps")),
            sample0: tensor(sd, &format!("{key}/sample0")),
            model_outputs: tensor(sd, &format!("{key}/model_outputs")),
            samples: tensor(sd, &format!("{key}/samples")),
            extras: sd
                .keys()
                .any(|k| k == &format!("{key}/extras"))
                .then(|| tensor(sd, &format!("{key}/extras"))),
        }
    }

    fn at(t: &Tensor<B, 5>, i: usize) -> Tensor<B, 4> {
        let [_, b, c, h, w] = t.dims();
        t.clone().narrow(0, i, 1).reshape([b, c, h, w])
    }

    /// Run `step` over the sequence, feeding our own samples forward, and compare every step.
    fn run(
        &self,
        what: &str,
        mut step: impl FnMut(Tensor<B, 4>, usize, Tensor<B, 4>, Option<Tensor<B, 4>>) -> Tensor<B, 4>,
    ) {
        let mut x = self.sample0.clone();
        let mut worst = 0f32;
        for (i, &t) in self.timesteps.iter().enumerate() {
            let extra = self.extras.as_ref().map(|e| Self::at(e, i));
            x = step(Self::at(&self.model_outputs, i), t, x, extra);
            let err = assert_close(
                &format!("{what} step {i} (t={t})"),
                x.clone(),
                Self::at(&self.samples, i),
                STEP_TOL,
            );
            worst = worst.max(err);
        }
        println!(
            "parity {what}: {} steps, worst max-abs {worst:.3e}",
            self.timesteps.len()
        );
    }
}

fn check_timesteps(what: &str, ours: &[usize], seq: &Seq) {
    assert_eq!(ours, seq.timesteps.as_slice(), "{what}: timesteps");
}

fn run_pndm(key: &str, mut s: PndmScheduler<B>, n: usize) {
    let sd = io(NAME);
    let seq = Seq::load(&sd, key);
    s.set_timesteps(n).unwrap();
    check_timesteps(key, s.timesteps(), &seq);
    seq.run(key, |e, t, x, _| s.step(e, t, x).unwrap());
}

#[test]
fn plms_blip_diffusion_sequence() {
    // 10 steps → 11 calls: plain, Heun pair on the duplicated timestep, AB2, AB3, AB4 ×6, final ᾱ_0.
    run_pndm("plms_blip", PndmScheduler::blip_diffusion(), 10);
}

#[test]
fn plms_sd15_sequence() {
    let sd15 = fixture_dir(NAME).join("sd15_scheduler_config.json");
    run_pndm(
        "plms_sd15",
        PndmScheduler::from_config_file(&sd15).unwrap(),
        7,
    );
}

#[test]
fn plms_v_prediction_sequence() {
    let s = PndmScheduler::new(PndmSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        steps_offset: 1,
        ..PndmSchedulerConfig::blip_diffusion()
    })
    .unwrap();
    run_pndm("plms_v", s, 6);
}

#[test]
fn prk_then_plms_sequence() {
    run_pndm(
        "prk",
        PndmScheduler::from_config_file(&cfg("pndm_prk")).unwrap(),
        10,
    );
}

fn run_ddim(key: &str, mut s: DdimScheduler, n: usize, eta: f32, clipped: bool) {
    let sd = io(NAME);
    let seq = Seq::load(&sd, key);
    s.set_timesteps(n).unwrap();
    check_timesteps(key, s.timesteps(), &seq);
    seq.run(key, |e, t, x, noise| {
        s.step_eta(e, t, x, eta, clipped, noise)
            .unwrap()
            .prev_sample
    });
}

#[test]
fn ddim_sequences() {
    run_ddim("ddim_sd15", DdimScheduler::sd15(), 10, 0.0, false);
    run_ddim(
        "ddim_default",
        DdimScheduler::from_config_file(&cfg("ddim_default")).unwrap(),
        8,
        0.0,
        false,
    );
    run_ddim("ddim_eta", DdimScheduler::sd15(), 8, 0.7, false);
    run_ddim(
        "ddim_clipped",
        DdimScheduler::from_config_file(&cfg("ddim_default")).unwrap(),
        6,
        1.0,
        true,
    );
    run_ddim(
        "ddim_v",
        DdimScheduler::from_config_file(&cfg("ddim_v")).unwrap(),
        6,
        0.0,
        false,
    );
}

#[test]
fn ddim_pred_original_sample() {
    let sd = io(NAME);
    let seq = Seq::load(&sd, "ddim_sd15");
    let mut s = DdimScheduler::sd15();
    s.set_timesteps(10).unwrap();
    let mut x = seq.sample0.clone();
    let x0_ref = seq
        .extras
        .clone()
        .expect("pred_original_sample saved as extras");
    for (i, &t) in seq.timesteps.iter().enumerate() {
        let out = s.step(Seq::at(&seq.model_outputs, i), t, x).unwrap();
        assert_close(
            &format!("ddim_sd15 pred_original_sample {i}"),
            out.pred_original_sample,
            Seq::at(&x0_ref, i),
            STEP_TOL,
        );
        x = out.prev_sample;
    }
}

#[test]
fn ddim_lavis_inversion_sequence() {
    let sd = io(NAME);
    let seq = Seq::load(&sd, "ddim_inversion");
    let mut s = DdimScheduler::sd15();
    s.set_timesteps(10).unwrap();
    let inv = s.inversion_timesteps();
    assert_eq!(&inv[..3], &[1, 101, 201]);
    check_timesteps("ddim_inversion", &inv, &seq);
    seq.run("ddim_inversion", |e, t, x, _| {
        s.inversion_step(e, t, x).unwrap()
    });
}

fn run_ddpm(key: &str, mut s: DdpmScheduler, n: usize) {
    let sd = io(NAME);
    let seq = Seq::load(&sd, key);
    s.set_timesteps(n).unwrap();
    check_timesteps(key, s.timesteps(), &seq);
    seq.run(key, |e, t, x, noise| {
        s.step(e, t, x, noise).unwrap().prev_sample
    });
}

#[test]
fn ddpm_sequences() {
    run_ddpm("ddpm_sd15", DdpmScheduler::sd15(), 8);
    run_ddpm(
        "ddpm_cos",
        DdpmScheduler::from_config_file(&cfg("ddpm_cos")).unwrap(),
        6,
    );
    run_ddpm(
        "ddpm_sigmoid",
        DdpmScheduler::from_config_file(&cfg("ddpm_sigmoid")).unwrap(),
        6,
    );
}

#[test]
fn step_errors() {
    let x = Tensor::<B, 4>::zeros([1, 1, 2, 2], &device());
    let mut p = PndmScheduler::<B>::blip_diffusion();
    assert!(
        p.step(x.clone(), 980, x.clone()).is_err(),
        "step before set_timesteps"
    );
    let d = DdimScheduler::sd15();
    assert!(
        d.step(x.clone(), 981, x.clone()).is_err(),
        "step before set_timesteps"
    );
    let mut d = DdimScheduler::sd15();
    d.set_timesteps(10).unwrap();
    assert!(
        d.step(x.clone(), 1000, x.clone()).is_err(),
        "timestep out of range"
    );
}
