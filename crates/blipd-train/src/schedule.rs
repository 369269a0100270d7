//! Learning-rate schedules, as functions of the number of completed optimizer steps.

use serde::{Deserialize, Serialize};

/// Shape of the schedule after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `lr` after warm-up (LAVIS `constant_lr`, diffusers `constant[_with_warmup]`).
    #[default]
    Constant,
    /// Half-cosine from `lr` to `min_lr` over the steps after warm-up
    /// (diffusers `cosine` with `min_lr = 0`; LAVIS `linear_warmup_cosine_lr` per step).
    Cosine,
    /// Linear from `lr` to `min_lr` over the steps after warm-up (diffusers `linear`).
    Linear,
}

/// `[schedule]` of a run config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Linear warm-up length in optimizer steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Learning rate of the first warm-up step (0 = diffusers/HF, 1e-6 = LAVIS stage 1).
    #[serde(default)]
    pub warmup_init_lr: f64,
    /// Final learning rate of the cosine / linear decay.
    #[serde(default)]
    pub min_lr: f64,
}

/// A schedule bound to its peak learning rate and run length.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub config: ScheduleConfig,
    pub base_lr: f64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(config: ScheduleConfig, base_lr: f64, total_steps: u64) -> Self {
        Self {
            config,
            base_lr,
            total_steps,
        }
    }

    /// Learning rate of the update that follows `step` completed updates (`step` = 0 for the
    /// first update): warm-up `init + (lr − init)·step/warmup` for `step < warmup`, then the
    /// decay over `step − warmup` of `total − warmup`.
    pub fn lr(&self, step: u64) -> f64 {
        let c = &self.config;
        if step < c.warmup_steps {
            let f = step as f64 / c.warmup_steps as f64;
            return c.warmup_init_lr + (self.base_lr - c.warmup_init_lr) * f;
        }
        let decay_steps = self.total_steps.saturating_sub(c.warmup_steps).max(1);
        let progress = ((step - c.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        match c.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Cosine => {
                c.min_lr
                    + (self.base_lr - c.min_lr)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Linear => c.min_lr + (self.base_lr - c.min_lr) * (1.0 - progress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, init: f64, min: f64) -> LrSchedule {
        LrSchedule::new(
            ScheduleConfig {
                kind,
                warmup_steps: warmup,
                warmup_init_lr: init,
                min_lr: min,
            },
            1e-4,
            100,
        )
    }

    #[test]
    fn constant_with_warmup_matches_hf() {
        // transformers.get_constant_schedule_with_warmup(opt, 10): factor step/10, then 1.
        let s = sched(ScheduleKind::Constant, 10, 0.0, 0.0);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-5).abs() < 1e-18);
        assert_eq!(s.lr(10), 1e-4);
        assert_eq!(s.lr(99), 1e-4);
    }

    #[test]
    fn cosine_matches_hf_formula() {
        // transformers.get_cosine_schedule_with_warmup(opt, 10, 100):
        // progress = (s-10)/90, factor = 0.5*(1+cos(pi*progress)).
        let s = sched(ScheduleKind::Cosine, 10, 0.0, 0.0);
        for step in [10u64, 20, 55, 99, 100] {
            let p = (step - 10) as f64 / 90.0;
            let want = 1e-4 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
            assert!((s.lr(step) - want).abs() < 1e-18, "step {step}");
        }
        assert!((s.lr(55) - 5e-5).abs() < 1e-12);
        assert!(s.lr(100).abs() < 1e-18);
    }

    #[test]
    fn lavis_warmup_cosine_to_min() {
        let s = sched(ScheduleKind::Cosine, 10, 1e-6, 1e-5);
        assert_eq!(s.lr(0), 1e-6);
        assert!((s.lr(100) - 1e-5).abs() < 1e-18);
        assert!(s.lr(50) < 1e-4 && s.lr(50) > 1e-5);
    }

    #[test]
    fn linear_decay() {
        let s = sched(ScheduleKind::Linear, 0, 0.0, 0.0);
        assert_eq!(s.lr(0), 1e-4);
        assert!((s.lr(50) - 5e-5).abs() < 1e-18);
    }
}
