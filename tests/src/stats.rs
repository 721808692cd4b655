//! Checking that a weighted split of connections across backends looks right.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

/// Asserts that `counts` (identity -> hits) is consistent with the split `expected`
/// (identity -> probability; the probabilities must add up to 1): for each expected id, with
/// n = the total of all counts, |observed - n*p| <= sigmas * sqrt(n*p*(1-p)) (the binomial
/// standard deviation; p of 0 or 1 therefore demands an exact count). Ids that are not expected
/// must not appear at all. Panics with a table of every id otherwise.
pub fn assert_split(counts: &HashMap<String, u64>, expected: &[(&str, f64)], sigmas: f64) {
    if let Err(table) = check_split(counts, expected, sigmas) {
        panic!("{table}");
    }
}

/// [`assert_split`] returning the failure table instead of panicking.
pub fn check_split(
    counts: &HashMap<String, u64>,
    expected: &[(&str, f64)],
    sigmas: f64,
) -> Result<(), String> {
    let total_p: f64 = expected.iter().map(|(_, p)| p).sum();
    assert!(
        (total_p - 1.0).abs() < 1e-9 && expected.iter().all(|(_, p)| (0.0..=1.0).contains(p)),
        "expected split {expected:?} is not a probability distribution (sum {total_p})"
    );
    let n: u64 = counts.values().sum();
    let nf = n as f64;

    let mut ok = n > 0;
    let mut table = format!(
        "split of {n} samples does not match (tolerance {sigmas} sigma):\n\
         {:<24} {:>8} {:>10} {:>10} {:>10} {:>8}  result\n",
        "id", "p", "observed", "expected", "tolerance", "sigmas"
    );
    if n == 0 {
        table.push_str("(no samples)\n");
    }
    let expected_ids: BTreeSet<&str> = expected.iter().map(|(id, _)| *id).collect();
    for &(id, p) in expected {
        let observed = counts.get(id).copied().unwrap_or(0);
        let mean = nf * p;
        let sd = (nf * p * (1.0 - p)).sqrt();
        let deviation = (observed as f64 - mean).abs();
        let tolerance = sigmas * sd;
        // A tiny epsilon keeps p = 0/1 (sd = 0) from failing on float noise in n*p.
        let row_ok = deviation <= tolerance + 1e-9;
        ok &= row_ok;
        let in_sigmas = if sd > 0.0 {
            deviation / sd
        } else if deviation > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        let _ = writeln!(
            table,
            "{id:<24} {p:>8.4} {observed:>10} {mean:>10.1} {tolerance:>10.1} {in_sigmas:>8.2}  {}",
            if row_ok { "ok" } else { "FAIL" }
        );
    }
    let mut unexpected: Vec<(&String, &u64)> = counts
        .iter()
        .filter(|(id, c)| !expected_ids.contains(id.as_str()) && **c > 0)
        .collect();
    unexpected.sort();
    for (id, observed) in unexpected {
        ok = false;
        let _ = writeln!(
            table,
            "{id:<24} {:>8} {observed:>10} {:>10} {:>10} {:>8}  FAIL (unexpected id)",
            "-", 0, 0, "-"
        );
    }
    if ok { Ok(()) } else { Err(table) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(id, n)| (id.to_string(), *n)).collect()
    }

    #[test]
    fn even_split_within_tolerance_passes() {
        // n=1000, p=0.5: sd = 15.8, so 4 sigma allows +-63.
        assert_split(
            &counts(&[("a", 530), ("b", 470)]),
            &[("a", 0.5), ("b", 0.5)],
            4.0,
        );
    }

    #[test]
    fn weighted_split_passes() {
        // n=1000, p=0.8: sd = 12.6.
        assert_split(
            &counts(&[("a", 790), ("b", 210)]),
            &[("a", 0.8), ("b", 0.2)],
            3.0,
        );
    }

    #[test]
    fn skewed_split_fails_with_table() {
        let err = check_split(
            &counts(&[("a", 600), ("b", 400)]),
            &[("a", 0.5), ("b", 0.5)],
            4.0,
        )
        .unwrap_err();
        assert!(err.contains("FAIL"), "{err}");
        assert!(err.contains("600"), "{err}");
    }

    #[test]
    #[should_panic(expected = "does not match")]
    fn assert_split_panics_on_skew() {
        assert_split(
            &counts(&[("a", 990), ("b", 10)]),
            &[("a", 0.5), ("b", 0.5)],
            4.0,
        );
    }

    #[test]
    fn unexpected_id_fails() {
        let err = check_split(&counts(&[("a", 100), ("c", 1)]), &[("a", 1.0)], 4.0).unwrap_err();
        assert!(err.contains("unexpected id"), "{err}");
        assert!(err.contains('c'), "{err}");
    }

    #[test]
    fn unexpected_id_with_zero_count_is_fine() {
        assert_split(&counts(&[("a", 100), ("c", 0)]), &[("a", 1.0)], 4.0);
    }

    #[test]
    fn zero_probability_demands_zero_hits() {
        assert_split(&counts(&[("a", 100)]), &[("a", 1.0), ("b", 0.0)], 4.0);
        let err = check_split(
            &counts(&[("a", 99), ("b", 1)]),
            &[("a", 1.0), ("b", 0.0)],
            4.0,
        )
        .unwrap_err();
        assert!(err.contains("FAIL"), "{err}");
    }

    #[test]
    fn no_samples_fails() {
        assert!(check_split(&HashMap::new(), &[("a", 1.0)], 4.0).is_err());
    }

    #[test]
    #[should_panic(expected = "not a probability distribution")]
    fn probabilities_must_sum_to_one() {
        assert_split(&counts(&[("a", 10)]), &[("a", 0.5)], 4.0);
    }
}
