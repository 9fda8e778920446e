//! Small numeric helpers shared by the strategies.

/// A numerically stable softmax. Entries equal to `-inf` get probability 0.
///
/// Returns `None` when the input is empty, holds a NaN or `+inf`, or is all `-inf`: there is no
/// distribution to speak of then.
pub(crate) fn softmax(xs: &[f64]) -> Option<Vec<f64>> {
    if xs.iter().any(|x| x.is_nan() || *x == f64::INFINITY) {
        return None;
    }
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let exps: Vec<f64> = xs.iter().map(|x| (x - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    // total >= 1 because the maximum contributes exp(0) = 1.
    Some(exps.into_iter().map(|e| e / total).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_handles_infinities() {
        let p = softmax(&[0.0, 0.0]).unwrap_or_default();
        assert_eq!(p, vec![0.5, 0.5]);
        let p = softmax(&[1000.0, 1000.0 + 2f64.ln()]).unwrap_or_default();
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-12 && (p[1] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(softmax(&[f64::NEG_INFINITY, 0.0]), Some(vec![0.0, 1.0]));
        assert_eq!(softmax(&[f64::NEG_INFINITY]), None);
        assert_eq!(softmax(&[f64::NAN, 0.0]), None);
        assert_eq!(softmax(&[f64::INFINITY, 0.0]), None);
        assert_eq!(softmax(&[]), None);
    }
}
