//! Training Co-LLM deferral heads (ALGORITHMS.md "Co-LLM"), the pure part: text-level weak labels,
//! a weighted logistic regression per assistant (full-batch Adam in f64, deterministic), the
//! threshold η (Youden's J or a target deferral rate), and ROC summaries. The data (hidden states and
//! each model's greedy guess at every gold position) comes from [`super::deferral_data`].

use std::str::FromStr;

use crate::deferral::sigmoid;

/// What a model would produce next at a gold position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guess {
    /// End of the answer.
    Eos,
    /// Text (UTF-8 bytes; may be empty when the model produced nothing usable).
    Text(Vec<u8>),
}

/// Whether a guess is right where the gold answer continues with `rest` (empty: the answer ends
/// here): non-empty text that starts `rest`, or EOS exactly at the end.
pub fn right(guess: &Guess, rest: &[u8]) -> bool {
    match guess {
        Guess::Eos => rest.is_empty(),
        Guess::Text(t) => !t.is_empty() && rest.starts_with(t),
    }
}

/// The weak label of one assistant at one position (**ours**, across tokenizers): the assistant's
/// next text starts the gold continuation and the base's next token does not.
pub fn label(base: &Guess, assistant: &Guess, rest: &[u8]) -> bool {
    right(assistant, rest) && !right(base, rest)
}

/// The positive class weight of the BCE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PosWeight {
    /// Negatives / positives of each head's training labels (1 when there is no positive).
    Auto,
    /// A fixed weight.
    Fixed(f64),
}

impl FromStr for PosWeight {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        match s.parse::<f64>() {
            Ok(w) if w.is_finite() && w > 0.0 => Ok(Self::Fixed(w)),
            _ => Err(format!(
                "--pos-weight takes `auto` or a positive number, got {s:?}"
            )),
        }
    }
}

impl PosWeight {
    /// The weight for these labels.
    pub fn for_labels(self, ys: &[bool]) -> f64 {
        match self {
            Self::Fixed(w) => w,
            Self::Auto => {
                let pos = ys.iter().filter(|y| **y).count();
                if pos == 0 {
                    1.0
                } else {
                    (ys.len() - pos) as f64 / pos as f64
                }
            }
        }
    }
}

/// How η is chosen on the validation split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EtaRule {
    /// The threshold maximising TPR − FPR (Youden's J).
    Youden,
    /// The threshold that defers at this share of positions.
    Rate(f64),
}

impl FromStr for EtaRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "youden" {
            return Ok(Self::Youden);
        }
        match s.strip_prefix("rate:").map(str::parse::<f64>) {
            Some(Ok(r)) if r > 0.0 && r < 1.0 => Ok(Self::Rate(r)),
            _ => Err(format!(
                "--eta-rule takes `youden` or `rate:R` with R in (0, 1), got {s:?}"
            )),
        }
    }
}

impl std::fmt::Display for EtaRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Youden => write!(f, "youden"),
            Self::Rate(r) => write!(f, "rate:{r}"),
        }
    }
}

/// Settings of one logistic regression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// Full-batch Adam steps.
    pub epochs: usize,
    /// Adam's step size.
    pub lr: f64,
    /// Weight of the positive class.
    pub pos_weight: f64,
    /// L2 penalty on the vector (not the bias), per example.
    pub l2: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            epochs: 400,
            lr: 0.02,
            pos_weight: 1.0,
            l2: 1e-4,
        }
    }
}

/// A fitted head.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// The vector g.
    pub g: Vec<f64>,
    /// The bias b.
    pub b: f64,
    /// The weighted BCE (without the penalty) before each step and after the last.
    pub losses: Vec<f64>,
}

impl Fit {
    /// σ(h·g + b).
    pub fn prob(&self, h: &[f32]) -> f64 {
        sigmoid(dot(&self.g, h) + self.b)
    }
}

fn dot(g: &[f64], h: &[f32]) -> f64 {
    g.iter().zip(h).map(|(a, x)| a * f64::from(*x)).sum()
}

/// `-log σ(z)` without overflow.
fn softplus_neg(z: f64) -> f64 {
    // -log σ(z) = log(1 + e^{-z})
    if z > 0.0 {
        (-z).exp().ln_1p()
    } else {
        -z + z.exp().ln_1p()
    }
}

/// The weighted BCE of a head on examples (mean over examples).
pub fn loss(g: &[f64], b: f64, xs: &[Vec<f32>], ys: &[bool], pos_weight: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let total: f64 = xs
        .iter()
        .zip(ys)
        .map(|(x, &y)| {
            let z = dot(g, x) + b;
            if y {
                pos_weight * softplus_neg(z)
            } else {
                softplus_neg(-z)
            }
        })
        .sum();
    total / xs.len() as f64
}

/// Fits `σ(h·g + b)` to labels by full-batch Adam from `g = init`, `b = 0`: deterministic (no
/// randomness; the sums run in example order).
pub fn fit(xs: &[Vec<f32>], ys: &[bool], init: &[f32], opts: &FitOptions) -> Fit {
    let d = init.len();
    let mut g: Vec<f64> = init.iter().map(|&x| f64::from(x)).collect();
    let mut b = 0.0;
    let (mut m, mut v) = (vec![0.0; d + 1], vec![0.0; d + 1]);
    let (beta1, beta2, eps): (f64, f64, f64) = (0.9, 0.999, 1e-8);
    let n = xs.len().max(1) as f64;
    let mut losses = Vec::with_capacity(opts.epochs + 1);
    for step in 1..=opts.epochs {
        let mut grad = vec![0.0; d + 1];
        let mut total = 0.0;
        for (x, &y) in xs.iter().zip(ys) {
            let z = dot(&g, x) + b;
            let p = sigmoid(z);
            let (l, dz) = if y {
                (opts.pos_weight * softplus_neg(z), opts.pos_weight * (p - 1.0))
            } else {
                (softplus_neg(-z), p)
            };
            total += l;
            for (gi, xi) in grad.iter_mut().zip(x) {
                *gi += dz * f64::from(*xi);
            }
            grad[d] += dz;
        }
        losses.push(total / n);
        for (i, gi) in grad.iter_mut().enumerate() {
            *gi /= n;
            if i < d {
                *gi += opts.l2 * g[i];
            }
        }
        let (c1, c2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
        for i in 0..=d {
            m[i] = beta1 * m[i] + (1.0 - beta1) * grad[i];
            v[i] = beta2 * v[i] + (1.0 - beta2) * grad[i] * grad[i];
            let delta = opts.lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            if i < d {
                g[i] -= delta;
            } else {
                b -= delta;
            }
        }
    }
    losses.push(loss(&g, b, xs, ys, opts.pos_weight));
    Fit { g, b, losses }
}

/// Area under the ROC curve (ties count one half); `None` without both classes.
pub fn auc(scores: &[f64], ys: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let pos = ys.iter().filter(|y| **y).count();
    let neg = ys.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    // Mann–Whitney: the sum of the positives' (average) ranks.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += idx[i..=j].iter().filter(|&&k| ys[k]).count() as f64 * avg;
        i = j + 1;
    }
    Some((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// Deferral rate, TPR and FPR of "defer when score > η".
pub fn rates(scores: &[f64], ys: &[bool], eta: f64) -> (f64, f64, f64) {
    let (mut tp, mut fp, mut pos, mut neg) = (0usize, 0usize, 0usize, 0usize);
    for (&s, &y) in scores.iter().zip(ys) {
        let defer = s > eta;
        if y {
            pos += 1;
            tp += usize::from(defer);
        } else {
            neg += 1;
            fp += usize::from(defer);
        }
    }
    let r = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    (r(tp + fp, pos + neg), r(tp, pos), r(fp, neg))
}

const ETA_MIN: f64 = 1e-6;
const ETA_MAX: f64 = 1.0 - 1e-6;

/// The threshold by `rule` for scores and labels ("defer when score > η"), within (0, 1): cuts fall
/// halfway between two distinct scores. Youden's J ties go to the higher η (fewer deferrals).
pub fn choose_eta(rule: EtaRule, scores: &[f64], ys: &[bool]) -> f64 {
    let mut sorted: Vec<f64> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted.dedup();
    if sorted.is_empty() {
        return 0.5;
    }
    // Candidate cuts, highest first: above everything, between neighbours, below everything.
    let mut cuts = vec![(sorted[0] + 1.0) / 2.0];
    cuts.extend(sorted.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    cuts.push(sorted[sorted.len() - 1] / 2.0);
    let eta = match rule {
        EtaRule::Youden => {
            let mut best = (f64::NEG_INFINITY, cuts[0]);
            for &c in &cuts {
                let (_, tpr, fpr) = rates(scores, ys, c);
                if tpr - fpr > best.0 + 1e-12 {
                    best = (tpr - fpr, c);
                }
            }
            best.1
        }
        EtaRule::Rate(r) => {
            let mut best = (f64::INFINITY, cuts[0]);
            for &c in &cuts {
                let (rate, _, _) = rates(scores, ys, c);
                if (rate - r).abs() < best.0 - 1e-12 {
                    best = ((rate - r).abs(), c);
                }
            }
            best.1
        }
    };
    eta.clamp(ETA_MIN, ETA_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_text_level() {
        let t = |s: &str| Guess::Text(s.as_bytes().to_vec());
        // The assistant's next text starts the gold rest, the base's does not: positive.
        assert!(label(&t(" Tax"), &t(" T"), b" Tarn"));
        // Both right, both wrong, or only the base right: negative.
        assert!(!label(&t(" Ta"), &t(" Tarn"), b" Tarn"));
        assert!(!label(&t("x"), &t("y"), b" Tarn"));
        assert!(!label(&t(" T"), &t("y"), b" Tarn"));
        // An assistant text longer than the rest is wrong; empty text is never right.
        assert!(!label(&t("x"), &t(" Tarns"), b" Tarn"));
        assert!(!label(&t("x"), &t(""), b" Tarn"));
        // At the end of the answer only EOS is right.
        assert!(label(&t("."), &Guess::Eos, b""));
        assert!(!label(&Guess::Eos, &Guess::Eos, b""));
        assert!(!label(&t("x"), &Guess::Eos, b"x"));
    }

    /// Two features; the label is "x0 > x1" with one noisy example.
    fn toy() -> (Vec<Vec<f32>>, Vec<bool>) {
        let xs: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let a = ((i * 37) % 17) as f32 / 8.0 - 1.0;
                let b = ((i * 11) % 13) as f32 / 6.0 - 1.0;
                vec![a, b]
            })
            .collect();
        let mut ys: Vec<bool> = xs.iter().map(|x| x[0] > x[1] + 0.5).collect();
        ys[3] = !ys[3];
        (xs, ys)
    }

    #[test]
    fn logistic_regression_learns_deterministically() {
        let (xs, ys) = toy();
        let opts = FitOptions {
            epochs: 300,
            lr: 0.05,
            pos_weight: PosWeight::Auto.for_labels(&ys),
            l2: 0.0,
        };
        let a = fit(&xs, &ys, &[0.0, 0.0], &opts);
        let b = fit(&xs, &ys, &[0.0, 0.0], &opts);
        assert_eq!(a, b, "same data, same fit, bit for bit");
        let (first, last) = (a.losses[0], a.losses[a.losses.len() - 1]);
        assert!((first - loss(&[0.0, 0.0], 0.0, &xs, &ys, opts.pos_weight)).abs() < 1e-12);
        assert!(last < 0.5 * first, "loss {first} → {last}");
        assert!(a.losses.windows(2).filter(|w| w[1] > w[0] + 1e-9).count() < 10);
        assert!(a.g[0] > 0.0 && a.g[1] < 0.0 && a.b < 0.0, "{a:?}");
        let scores: Vec<f64> = xs.iter().map(|x| a.prob(x)).collect();
        assert!(auc(&scores, &ys).unwrap_or(0.0) > 0.9);
    }

    #[test]
    fn auc_eta_and_rates_on_a_small_roc() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.2, 0.1];
        let ys = [true, true, false, true, false, false];
        assert!((auc(&scores, &ys).unwrap_or(0.0) - 8.0 / 9.0).abs() < 1e-12);
        assert_eq!(auc(&scores, &[true; 6]), None);
        // J is 2/3 at cuts 0.75 (TPR 2/3, FPR 0) and 0.4 (TPR 1, FPR 1/3): the higher cut wins.
        let eta = choose_eta(EtaRule::Youden, &scores, &ys);
        assert!((eta - 0.75).abs() < 1e-12, "{eta}");
        assert_eq!(rates(&scores, &ys, eta), (2.0 / 6.0, 2.0 / 3.0, 0.0));
        let eta = choose_eta(EtaRule::Rate(0.5), &scores, &ys);
        assert!((eta - 0.65).abs() < 1e-12, "{eta}");
        assert_eq!("rate:0.2".parse::<EtaRule>(), Ok(EtaRule::Rate(0.2)));
        assert!("rate:1".parse::<EtaRule>().is_err() && "3".parse::<PosWeight>().is_ok());
        assert_eq!(PosWeight::Auto.for_labels(&ys), 1.0);
        assert_eq!(PosWeight::Auto.for_labels(&[true, false, false, false]), 3.0);
    }
}
