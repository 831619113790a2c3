//! Layer placement: which worker runs which contiguous range of transformer blocks.
//!
//! A [`Plan`] holds one [`LayerRange`] per worker, in the order a step visits them, and is checked
//! on construction to cover `0..n_layers` exactly once, in order, with no empty range. It is
//! written and parsed as inclusive ranges, `0-14,15-29`, the way people count layers.

use std::fmt;
use std::str::FromStr;

use realm_common::model::LayerRange;

use crate::error::{Error, Result};

/// How the operator asks for the layers to be placed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PlanSpec {
    /// Contiguous ranges proportional to the memory each worker reports.
    #[default]
    Auto,
    /// Inclusive ranges in worker order, e.g. `0-14,15-29`.
    Manual(String),
}

impl FromStr for PlanSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Plan(
                "empty plan (give `auto` or ranges such as 0-14,15-29)".to_string(),
            ));
        }
        Ok(if s.eq_ignore_ascii_case("auto") {
            Self::Auto
        } else {
            Self::Manual(s.to_string())
        })
    }
}

impl fmt::Display for PlanSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Manual(s) => f.write_str(s),
        }
    }
}

/// One contiguous layer range per worker, covering `0..n_layers` exactly once, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Non-empty, `ranges[0].start == 0`, each range starts where the previous one ends, the last
    /// ends at `n_layers`.
    ranges: Vec<LayerRange>,
}

impl Plan {
    /// Checks that `ranges` cover `0..n_layers` exactly once, in order.
    pub fn new(ranges: Vec<LayerRange>, n_layers: usize) -> Result<Self> {
        if ranges.is_empty() {
            return Err(Error::Plan("a plan needs at least one range".to_string()));
        }
        let mut next = 0;
        for r in &ranges {
            if r.is_empty() {
                return Err(Error::Plan(format!(
                    "range {}..{} is empty",
                    r.start, r.end
                )));
            }
            if r.end > n_layers {
                return Err(Error::Plan(format!(
                    "range {r} goes past the model's last layer {}",
                    n_layers.saturating_sub(1)
                )));
            }
            if r.start > next {
                return Err(Error::Plan(format!(
                    "layers {}-{} are in no range (gap before {r})",
                    next,
                    r.start - 1
                )));
            }
            if r.start < next {
                return Err(Error::Plan(format!(
                    "range {r} overlaps the layers before it (or is out of order): it should start at {next}"
                )));
            }
            next = r.end;
        }
        if next != n_layers {
            return Err(Error::Plan(format!(
                "layers {}-{} are in no range (the model has {n_layers} layers)",
                next,
                n_layers - 1
            )));
        }
        Ok(Self { ranges })
    }

    /// Parses inclusive ranges such as `0-14,15-29` (a single layer may be written `7`) for a
    /// model of `n_layers` layers spread over `n_workers` workers.
    pub fn parse(spec: &str, n_layers: usize, n_workers: usize) -> Result<Self> {
        let ranges = spec
            .split(',')
            .map(|part| parse_range(part.trim()))
            .collect::<Result<Vec<_>>>()?;
        if ranges.len() != n_workers {
            return Err(Error::Plan(format!(
                "`{spec}` has {} ranges for {n_workers} workers",
                ranges.len()
            )));
        }
        Self::new(ranges, n_layers)
    }

    /// Contiguous ranges sized in proportion to each worker's memory, at least one layer each.
    /// Workers that all report nothing (0 bytes) are treated as equal.
    pub fn auto(n_layers: usize, memory_bytes: &[u64]) -> Result<Self> {
        let k = memory_bytes.len();
        if k == 0 {
            return Err(Error::Plan("no workers to place layers on".to_string()));
        }
        if k > n_layers {
            return Err(Error::Plan(format!(
                "{k} workers for {n_layers} layers: every worker needs at least one layer"
            )));
        }
        let total: u128 = memory_bytes.iter().map(|&m| u128::from(m)).sum();
        let weight = |i: usize| -> u128 {
            if total == 0 {
                1
            } else {
                u128::from(memory_bytes[i])
            }
        };
        let total = if total == 0 { k as u128 } else { total };
        // Boundary i is the cumulative share of the first i workers, rounded to nearest, then
        // pushed so every worker keeps at least one layer and leaves one for each after it.
        let n = n_layers as u128;
        let mut ranges = Vec::with_capacity(k);
        let (mut start, mut cumulative) = (0usize, 0u128);
        for i in 0..k {
            cumulative += weight(i);
            let end = if i + 1 == k {
                n_layers
            } else {
                let ideal = ((n * cumulative + total / 2) / total) as usize;
                ideal.clamp(start + 1, n_layers - (k - i - 1))
            };
            ranges.push(LayerRange::new(start, end)?);
            start = end;
        }
        Self::new(ranges, n_layers)
    }

    /// Resolves `spec` for a model of `n_layers` over workers reporting `memory_bytes`.
    pub fn from_spec(spec: &PlanSpec, n_layers: usize, memory_bytes: &[u64]) -> Result<Self> {
        match spec {
            PlanSpec::Auto => Self::auto(n_layers, memory_bytes),
            PlanSpec::Manual(s) => Self::parse(s, n_layers, memory_bytes.len()),
        }
    }

    pub fn ranges(&self) -> &[LayerRange] {
        &self.ranges
    }

    pub fn n_layers(&self) -> usize {
        self.ranges.last().map_or(0, |r| r.end)
    }

    pub fn n_workers(&self) -> usize {
        self.ranges.len()
    }
}

/// Inclusive ranges, comma-separated: `0-14,15-29`.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// `a-b` (inclusive) or `a`.
fn parse_range(part: &str) -> Result<LayerRange> {
    let number = |s: &str| -> Result<usize> {
        s.trim().parse().map_err(|_| {
            Error::Plan(format!(
                "`{part}` is not a layer range (write inclusive ranges such as 0-14)"
            ))
        })
    };
    let (first, last) = match part.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => {
            let layer = number(part)?;
            (layer, layer)
        }
    };
    if last < first {
        return Err(Error::Plan(format!("range `{part}` ends before it starts")));
    }
    let end = last
        .checked_add(1)
        .ok_or_else(|| Error::Plan(format!("range `{part}` is out of range")))?;
    LayerRange::new(first, end).map_err(|e| Error::Plan(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(plan: &Plan) -> Vec<(usize, usize)> {
        plan.ranges().iter().map(|r| (r.start, r.end)).collect()
    }

    fn err(r: Result<Plan>) -> String {
        r.expect_err("should be refused").to_string()
    }

    #[test]
    fn parses_inclusive_ranges_and_prints_them_back() {
        let plan = Plan::parse("0-14,15-29", 30, 2).unwrap();
        assert_eq!(ranges(&plan), [(0, 15), (15, 30)]);
        assert_eq!(plan.to_string(), "0-14,15-29");
        assert_eq!(plan.n_layers(), 30);
        assert_eq!(plan.n_workers(), 2);

        let plan = Plan::parse(" 0-0 , 1-16,17 ", 18, 3).unwrap();
        assert_eq!(ranges(&plan), [(0, 1), (1, 17), (17, 18)]);
        assert_eq!(plan.to_string(), "0-0,1-16,17-17");
        assert_eq!(Plan::parse("0-29", 30, 1).unwrap().to_string(), "0-29");
    }

    #[test]
    fn bad_manual_plans_say_what_is_wrong() {
        assert!(err(Plan::parse("0-13,15-29", 30, 2)).contains("layers 14-14 are in no range"));
        assert!(err(Plan::parse("0-15,15-29", 30, 2)).contains("overlaps"));
        assert!(err(Plan::parse("15-29,0-14", 30, 2)).contains("layers 0-14 are in no range"));
        assert!(err(Plan::parse("0-14,15-30", 30, 2)).contains("past the model's last layer 29"));
        assert!(err(Plan::parse("0-14,15-28", 30, 2)).contains("layers 29-29 are in no range"));
        assert!(err(Plan::parse("0-14,15-29", 30, 3)).contains("2 ranges for 3 workers"));
        assert!(err(Plan::parse("0-29", 30, 2)).contains("1 ranges for 2 workers"));
        assert!(err(Plan::parse("9-3,4-29", 30, 2)).contains("ends before it starts"));
        assert!(err(Plan::parse("0-x,15-29", 30, 2)).contains("not a layer range"));
        assert!(err(Plan::parse("0-14,,15-29", 30, 2)).contains("not a layer range"));
        assert!(err(Plan::parse("-3-4", 30, 1)).contains("not a layer range"));
        assert!(err(Plan::parse(&format!("0-{}", usize::MAX), 30, 1)).contains("out of range"));
    }

    #[test]
    fn auto_splits_equal_memory_evenly() {
        assert_eq!(Plan::auto(30, &[8, 8]).unwrap().to_string(), "0-14,15-29");
        assert_eq!(
            Plan::auto(30, &[1, 1, 1]).unwrap().to_string(),
            "0-9,10-19,20-29"
        );
        assert_eq!(Plan::auto(18, &[0, 0]).unwrap().to_string(), "0-8,9-17");
        assert_eq!(Plan::auto(30, &[5]).unwrap().to_string(), "0-29");
        let four = Plan::auto(30, &[4, 4, 4, 4]).unwrap();
        assert!(four.ranges().iter().all(|r| r.len() == 7 || r.len() == 8));
    }

    #[test]
    fn auto_follows_memory_and_gives_everyone_a_layer() {
        // Three quarters of the memory gets about three quarters of the layers.
        let plan = Plan::auto(30, &[3 << 30, 1 << 30]).unwrap();
        assert_eq!(plan.to_string(), "0-22,23-29");
        // A worker with (almost) nothing still gets one layer, and so does each after it.
        let plan = Plan::auto(30, &[0, 1 << 40, 0]).unwrap();
        assert_eq!(ranges(&plan), [(0, 1), (1, 29), (29, 30)]);
        let plan = Plan::auto(4, &[u64::MAX, u64::MAX, 1, 1]).unwrap();
        assert_eq!(ranges(&plan), [(0, 1), (1, 2), (2, 3), (3, 4)]);
        // As many workers as layers: one each.
        let plan = Plan::auto(3, &[9, 1, 5]).unwrap();
        assert_eq!(plan.to_string(), "0-0,1-1,2-2");
    }

    #[test]
    fn auto_refuses_impossible_splits() {
        assert!(err(Plan::auto(2, &[1, 1, 1])).contains("3 workers for 2 layers"));
        assert!(err(Plan::auto(30, &[])).contains("no workers"));
    }

    #[test]
    fn plans_are_checked_however_they_are_built() {
        let r = |a, b| LayerRange { start: a, end: b };
        assert!(Plan::new(vec![], 30).is_err());
        assert!(Plan::new(vec![r(0, 10), r(10, 10), r(10, 30)], 30)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(Plan::new(vec![r(0, 30)], 30).is_ok());
    }

    #[test]
    fn specs_parse() {
        assert_eq!("auto".parse::<PlanSpec>().unwrap(), PlanSpec::Auto);
        assert_eq!("AUTO".parse::<PlanSpec>().unwrap(), PlanSpec::Auto);
        assert_eq!(
            "0-14,15-29".parse::<PlanSpec>().unwrap(),
            PlanSpec::Manual("0-14,15-29".to_string())
        );
        assert!(" ".parse::<PlanSpec>().is_err());
        let spec: PlanSpec = "0-9,10-29".parse().unwrap();
        assert_eq!(
            Plan::from_spec(&spec, 30, &[1, 100]).unwrap().to_string(),
            "0-9,10-29"
        );
        assert_eq!(
            Plan::from_spec(&PlanSpec::Auto, 30, &[1, 1])
                .unwrap()
                .to_string(),
            "0-14,15-29"
        );
    }
}
