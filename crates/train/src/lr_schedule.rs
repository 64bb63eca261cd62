//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr` (nanoGPT's get_lr).

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay_steps: u64,
}

impl CosineSchedule {
    /// LR for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let ratio = (step - self.warmup_steps) as f64 / span;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_floor() {
        let s = CosineSchedule { lr: 1.0, min_lr: 0.1, warmup_steps: 10, decay_steps: 110 };
        assert!(s.lr_at(0) > 0.0 && s.lr_at(0) < s.lr_at(5));
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12); // half way: min + 0.5·(max - min)
        assert_eq!(s.lr_at(110), 0.1);
        assert_eq!(s.lr_at(10_000), 0.1);
        for i in 10..110 {
            assert!(s.lr_at(i + 1) <= s.lr_at(i), "monotone decay at {i}");
        }
    }
}
