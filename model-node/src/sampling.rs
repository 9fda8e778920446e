//! Choosing the next token from logits: greedy, or temperature + top-k + top-p with a seeded RNG.

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Sampling settings, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Keep the k most likely tokens (None = all).
    pub top_k: Option<usize>,
    /// RNG seed (None = derived from the context, so a repeated call gives the same text).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
        }
    }
}

/// A sampler for one generation.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`, or with `fallback_seed` when unset.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let rng = StdRng::seed_from_u64(params.seed.unwrap_or(fallback_seed));
        Self { params, rng }
    }

    /// Picks a token among `candidates` (ids) given the full `logits`. `None` when `candidates` is empty.
    pub fn pick(&mut self, logits: &[f32], candidates: &[u32]) -> Option<u32> {
        let logit = |id: u32| logits.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
        if self.params.temperature <= 0.0 {
            // Greedy; ties go to the lowest id (candidates are ascending or checked explicitly).
            let mut best: Option<(u32, f32)> = None;
            for &id in candidates {
                let l = logit(id);
                if best.is_none_or(|(bid, bl)| l > bl || (l == bl && id < bid)) {
                    best = Some((id, l));
                }
            }
            return best.map(|b| b.0);
        }
        let t = self.params.temperature;
        let mut scored: Vec<(u32, f32)> = candidates.iter().map(|&id| (id, logit(id) / t)).collect();
        if scored.is_empty() {
            return None;
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.params.top_k.filter(|&k| k < scored.len()) {
            scored.select_nth_unstable_by(k, by_logit);
            scored.truncate(k);
        }
        scored.sort_unstable_by(by_logit);
        let max = scored[0].1;
        let weights: Vec<f64> = scored.iter().map(|s| f64::from(s.1 - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = weights.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, w) in weights.iter().enumerate() {
                acc += w / total;
                if acc >= f64::from(self.params.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f64 = weights[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (s, w) in scored[..keep].iter().zip(&weights) {
            if u < *w {
                return Some(s.0);
            }
            u -= w;
        }
        Some(scored[keep - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.pick(&[0.0, 2.0, 2.0, 1.0], &[0, 1, 2, 3]), Some(1));
        assert_eq!(s.pick(&[0.0, 2.0, 2.0, 1.0], &[0, 3]), Some(3));
        assert_eq!(s.pick(&[0.0], &[]), None);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let ids: Vec<u32> = (0..50).collect();
        let p = SamplingParams {
            temperature: 1.5,
            top_p: 1.0,
            top_k: Some(1),
            seed: Some(3),
        };
        let argmax = Sampler::new(SamplingParams::default(), 0).pick(&logits, &ids);
        assert_eq!(Sampler::new(p, 0).pick(&logits, &ids), argmax);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: None,
            seed: Some(7),
        };
        let a: Vec<_> = {
            let mut s = Sampler::new(p.clone(), 0);
            (0..20).map(|_| s.pick(&logits, &ids)).collect()
        };
        let b: Vec<_> = {
            let mut s = Sampler::new(p, 0);
            (0..20).map(|_| s.pick(&logits, &ids)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "sampling should vary: {a:?}"
        );
    }

    #[test]
    fn tiny_top_p_keeps_only_the_best() {
        let logits = [0.0f32, 5.0, 1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            top_k: None,
            seed: Some(1),
        };
        let mut s = Sampler::new(p, 0);
        for _ in 0..20 {
            assert_eq!(s.pick(&logits, &[0, 1, 2]), Some(1));
        }
    }
}
