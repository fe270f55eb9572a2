//! LPN parameter sets of Ferret's primal iteration with regular noise, and the cost
//! formulas that follow from them.
//!
//! An iteration with parameters (t, h, k) produces n = t·2^h COTs: t GGM trees of 2^h
//! leaves (one noise position per tree: *regular* noise of weight t), each leaf mixed with
//! d = 10 positions of a stock of k COTs (the local linear code). It keeps back
//! `reserve = k + t·h` of its outputs as the next iteration's stock (k for the code, t·h
//! base COTs for the next trees' level OTs) and hands out `usable = n - reserve`.
//!
//! Traffic of one iteration, all from the COT sender to the receiver (the semi-honest
//! variant needs nothing from the receiver, see `mpcot.rs`): per tree, two blocks per level
//! and one correction block, `t·(2h + 1)·16` bytes. Bits per usable COT:
//!
//! ```text
//!   bits/COT = 128·t·(2h + 1) / (t·2^h − 2^log_k − t·h)
//!   MAIN:      128·1280·27 / (10,485,760 − 524,288 − 16,640) = 4,423,680 / 9,944,832 ≈ 0.445
//! ```
//!
//! # Which parameters, and why
//!
//! Ferret (Yang, Weng, Lan, Zhang, Wang, CCS 2020, ePrint 2020/924) tabulates primal-LPN
//! parameters with regular noise for 128-bit security, one set for the main iteration and
//! a smaller one for bootstrapping. The reference implementation's 2021 constants follow
//! that table (emp-ot `constants.h`: n = 10,608,640 = 1,295·2^13, k = 589,824, t = 1,295;
//! bootstrap n = 649,728 = 1,269·2^9, k = 36,288, t = 1,269); we could not read the paper's
//! table itself here, only the reference's copies of it. Those estimates predate the
//! algebraic attack on regular syndrome decoding of Briaud and Øygarden (Eurocrypt 2023)
//! and the hybrid attacks that followed, and the reference re-derived its sets since. We
//! use its current sets (emp-toolkit/emp-ot `tuning.h`, 2026), estimated with the
//! regular-LPN estimator against Gauss, SD-ISD, BJMM, hybrid, Esser et al. and AGB attacks,
//! as quoted in emp-ot commit 7a7e8c7 ("t=1280 -> 138.5 bits", "t=1900 -> 128.2 bits" at
//! k = 2^19, bins of 2^13) and 1d03397 (b10: "~128.7 bits at t=850, logk=16,
//! tree_depth=10; all other (cheaper) attacks land ≥ 131 bits"):
//!
//! | set | t | h (bin 2^h) | k | n | estimate |
//! |---|---|---|---|---|---|
//! | [`MAIN`] | 1,280 | 13 | 2^19 | 10,485,760 | 138.5 bits (emp-ot's `ferret_b13` with t = 1280) |
//! | [`BOOTSTRAP`] | 850 | 10 | 2^16 | 870,400 | ≈ 128.7 bits (hybrid attack, the binding one; emp-ot's `ferret_b10`, marked tentative there) |
//!
//! emp-ot now runs the main set at t = 1,900 (n = 15,564,800, 128.2 bits, the largest t at
//! the 128-bit floor). We keep t = 1,280: ten bits of margin for 1.7% more traffic per COT
//! (0.445 against 0.437 bits) and a third less memory per iteration (160 MiB of blocks per
//! direction and party instead of 238 MiB). Every set here, as in emp-ot, has
//! n = t·2^h exactly: a bin is a whole tree, so the receiver's noise position in a bin is
//! just its h random base-COT choice bits (no correction message).
//!
//! The bootstrapping set is run once per session and direction, on k + t·h = 74,036 IKNP
//! COTs; its 870,400 outputs hold the main set's stock (540,928) and 329,472 spare COTs.

use super::super::OtError;

/// Positions of the stock each output of the local linear code mixes (Ferret's d).
pub const D: usize = 10;

/// One LPN parameter set (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FerretParams {
    /// trees per iteration = noise weight t
    pub t: usize,
    /// depth of each tree: a bin (tree) has 2^h leaves
    pub h: u32,
    /// log2 of the LPN dimension k (the code's stock)
    pub log_k: u32,
}

/// The main iteration (emp-ot `ferret_b13` at t = 1,280, k = 2^19; 138.5-bit estimate).
pub const MAIN: FerretParams = FerretParams {
    t: 1280,
    h: 13,
    log_k: 19,
};

/// The bootstrapping iteration, run once per session on IKNP COTs (emp-ot `ferret_b10`).
pub const BOOTSTRAP: FerretParams = FerretParams {
    t: 850,
    h: 10,
    log_k: 16,
};

impl FerretParams {
    /// Outputs of one iteration, n = t·2^h.
    pub const fn n(&self) -> usize {
        self.t << self.h
    }

    /// The LPN dimension k = 2^log_k.
    pub const fn k(&self) -> usize {
        1 << self.log_k
    }

    /// Base COTs one iteration consumes: k for the code, h per tree for the level OTs.
    pub const fn reserve(&self) -> usize {
        self.k() + self.t * self.h as usize
    }

    /// COTs one iteration hands out when the next iteration uses the same set.
    pub const fn usable(&self) -> usize {
        self.n() - self.reserve()
    }

    /// Bytes one iteration sends (sender to receiver): t·(2h + 1) blocks.
    pub const fn iteration_bytes(&self) -> usize {
        self.t * (2 * self.h as usize + 1) * 16
    }

    /// Bits per usable COT in steady state (the formula of the module documentation).
    pub fn bits_per_cot(&self) -> f64 {
        (8 * self.iteration_bytes()) as f64 / self.usable() as f64
    }

    /// Checks the shape the implementation relies on: at least 4 and at most 2^24 leaves
    /// per tree (the level OTs index levels with 8 bits and leaves in u32), a code stock
    /// of 4..=2^30 COTs, and an iteration that yields more than it consumes.
    pub fn check(&self) -> Result<(), OtError> {
        let ok = self.t >= 1
            && (2..=24).contains(&self.h)
            && (2..=30).contains(&self.log_k)
            && self.t.checked_shl(self.h).is_some_and(|n| n < 1 << 40)
            && self.n() > self.reserve();
        if ok {
            Ok(())
        } else {
            Err(OtError::BadRequest(format!("Ferret parameters {self:?}")))
        }
    }

    /// Checks a (bootstrap, main) pair: both valid and one bootstrap iteration yields the
    /// main stock. Returns the spare COTs the bootstrap leaves per direction.
    pub fn check_pair(boot: &FerretParams, main: &FerretParams) -> Result<usize, OtError> {
        boot.check()?;
        main.check()?;
        if boot.n() < main.reserve() {
            return Err(OtError::BadRequest(format!(
                "bootstrap set yields {} COTs, the main set needs {}",
                boot.n(),
                main.reserve()
            )));
        }
        Ok(boot.n() - main.reserve())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_sets_have_the_documented_shape_and_cost() {
        assert_eq!(MAIN.n(), 10_485_760);
        assert_eq!(MAIN.reserve(), 524_288 + 16_640);
        assert_eq!(MAIN.usable(), 9_944_832);
        assert_eq!(MAIN.iteration_bytes(), 552_960);
        assert!((MAIN.bits_per_cot() - 4_423_680.0 / 9_944_832.0).abs() < 1e-12);
        assert!(MAIN.bits_per_cot() < 0.45);
        assert_eq!(BOOTSTRAP.n(), 870_400);
        assert_eq!(BOOTSTRAP.reserve(), 74_036);
        assert_eq!(
            FerretParams::check_pair(&BOOTSTRAP, &MAIN).unwrap(),
            329_472
        );
    }

    #[test]
    fn malformed_sets_are_refused() {
        let bad = [
            FerretParams { t: 0, ..MAIN },
            FerretParams { h: 1, ..MAIN },
            FerretParams { log_k: 31, ..MAIN },
            // consumes more than it yields
            FerretParams {
                t: 4,
                h: 4,
                log_k: 10,
            },
        ];
        for p in bad {
            assert!(p.check().is_err(), "{p:?}");
        }
        let small = FerretParams {
            t: 4,
            h: 4,
            log_k: 4,
        };
        assert!(FerretParams::check_pair(&small, &MAIN).is_err());
    }
}
