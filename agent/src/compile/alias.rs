//! Walker/Vose alias tables: an exact weighted pick in O(1) with one slot per backend.
//!
//! Each column `i` keeps `primary = i` with probability `threshold_i / 2^32` and otherwise
//! redirects to `alias_i`. Drawing a column uniformly and then the biased coin reproduces the
//! weights up to 2^-32 rounding, which is far inside the 1 % the kernel pick must meet.

/// One column of the table, over indices into the caller's backend list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub primary: usize,
    pub alias: usize,
    /// Probability of `primary`, scaled to 2^32 and saturated at `u32::MAX` ("always").
    pub threshold: u32,
}

const SCALE: f64 = 4_294_967_296.0; // 2^32

/// Builds the table for `weights` (non-negative, not all zero). Returns an empty table when no
/// weight is positive.
pub fn build(weights: &[f64]) -> Vec<Column> {
    let n = weights.len();
    let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    if n == 0 || total <= 0.0 {
        return Vec::new();
    }
    // Scaled so the average column holds exactly 1.0.
    let mut prob: Vec<f64> = weights
        .iter()
        .map(|w| {
            if w.is_finite() && *w > 0.0 {
                w * n as f64 / total
            } else {
                0.0
            }
        })
        .collect();
    let mut columns: Vec<Column> = (0..n)
        .map(|i| Column {
            primary: i,
            alias: i,
            threshold: u32::MAX,
        })
        .collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| prob[i] < 1.0);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        columns[s].alias = l;
        columns[s].threshold = to_threshold(prob[s]);
        prob[l] -= 1.0 - prob[s];
        if prob[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    // Whatever remains is 1.0 up to rounding: always keep the primary.
    columns
}

fn to_threshold(p: f64) -> u32 {
    (p * SCALE).clamp(0.0, u32::MAX as f64) as u32
}

/// The probability of each backend implied by a table (what the kernel will actually do).
pub fn probabilities(columns: &[Column], n: usize) -> Vec<f64> {
    let mut p = vec![0.0; n];
    if columns.is_empty() {
        return p;
    }
    let per_column = 1.0 / columns.len() as f64;
    for c in columns {
        let keep = if c.threshold == u32::MAX && c.primary == c.alias {
            1.0
        } else {
            c.threshold as f64 / SCALE
        };
        p[c.primary] += per_column * keep;
        p[c.alias] += per_column * (1.0 - keep);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_close(weights: &[f64]) {
        let table = build(weights);
        let total: f64 = weights.iter().sum();
        let p = probabilities(&table, weights.len());
        for (i, w) in weights.iter().enumerate() {
            assert!((p[i] - w / total).abs() < 1e-6, "{weights:?} → {p:?}");
        }
    }

    #[test]
    fn istio_weight_examples() {
        assert_close(&[80.0, 20.0]);
        assert_close(&[1.0, 3.0]);
        assert_close(&[0.0, 100.0]);
        assert_close(&[1.0, 1.0, 1.0]);
        assert_close(&[50.0]);
    }

    #[test]
    fn zero_weight_backend_is_never_picked() {
        let table = build(&[0.0, 100.0]);
        assert_eq!(probabilities(&table, 2)[0], 0.0);
        for c in &table {
            assert!(c.primary != 0 || c.threshold == 0, "{c:?}");
        }
    }

    #[test]
    fn all_zero_is_empty() {
        assert!(build(&[0.0, 0.0]).is_empty());
        assert!(build(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn any_weights_are_reproduced(weights in proptest::collection::vec(0u32..10_000, 1..64)) {
            prop_assume!(weights.iter().any(|w| *w > 0));
            let w: Vec<f64> = weights.iter().map(|x| *x as f64).collect();
            let table = build(&w);
            prop_assert_eq!(table.len(), w.len());
            let total: f64 = w.iter().sum();
            let p = probabilities(&table, w.len());
            for i in 0..w.len() {
                prop_assert!((p[i] - w[i] / total).abs() < 1e-6);
            }
        }
    }
}
