//! `fusion-client audit`: N independent Fusion batches against a server, counting the
//! batches Fusion flags and the batches it accepts, with the measured rates' exact
//! (Clopper-Pearson) 99% intervals and the exact escape bound of the parameters used.
//!
//! Against a cheating server an accepted batch is an escape; against an honest server a
//! flagged batch is a false alarm (none is expected: (a) and (b) never flag an honest
//! server, and (c) tests the published pool labels, the same for every batch). The audit
//! does not know which kind of server it
//! talks to: it reports both counts and lets the reader name them. Each batch has its
//! own random own inputs (MNIST test images 1000.., outside the public pool), its own
//! public draw and its own secret order; batches run `--per-session` at a time in one
//! protocol session (one HE/OT set-up per session).
//!
//! The audit bypasses the trust store ([`crate::trust`]): it talks to cheating servers
//! on purpose, with public test images only, so it neither refuses a distrusted server
//! nor records the servers it catches.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use fusion_common::fusion::check::binomial_cdf;
use fusion_common::fusion::tune;
use fusion_common::net::ServiceInfo;
use fusion_common::nn::mnist::Dataset;
use rand::Rng;
use serde::Serialize;

use crate::args::ConnectArgs;
use crate::client::Client;
use crate::infer::{FusionArgs, public_dataset};
use crate::verified::{FusionError, FusionOptions, PublicRows, Setting, run_sessions};

/// Flags of `audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Independent Fusion batches to run.
    #[arg(long, default_value_t = 20,
          value_parser = fusion_server::cli::at_least_one::<usize>)]
    pub trials: usize,
    /// Own inputs B per batch.
    #[arg(long, default_value_t = 3)]
    pub batch: usize,
    #[command(flatten)]
    pub fusion: FusionArgs,
    /// Batches per protocol session.
    #[arg(long, default_value_t = 10,
          value_parser = fusion_server::cli::at_least_one::<usize>)]
    pub per_session: usize,
    /// Also report the exact escape probability of a server altering exactly K rows
    /// (e.g. 2 for `flip-rows:2`).
    #[arg(long)]
    pub altered_rows: Option<usize>,
    /// The directory of the MNIST gzip IDX files (default: the bundled data/mnist).
    #[arg(long, env = "FUSION_MNIST_DIR")]
    pub mnist_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// An exact two-sided Clopper-Pearson interval for k successes in n trials at
/// `confidence` (e.g. 0.99): [p_lo, p_hi] with P[Bin(n, p_lo) >= k] = P[Bin(n, p_hi) <= k]
/// = (1 - confidence) / 2 (p_lo = 0 when k = 0, p_hi = 1 when k = n), by bisection on the
/// exact binomial tail.
pub fn clopper_pearson(k: usize, n: usize, confidence: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let a = (1.0 - confidence) / 2.0;
    let bisect = |f: &dyn Fn(f64) -> bool| {
        // f is true on [0, x*) and false on (x*, 1]
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if f(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let lo = if k == 0 {
        0.0
    } else {
        // P[X >= k | p] = 1 - P[X <= k-1 | p] increases with p
        bisect(&|p| 1.0 - binomial_cdf(n, p, k - 1) < a)
    };
    let hi = if k >= n {
        1.0
    } else {
        // P[X <= k | p] decreases with p
        bisect(&|p| binomial_cdf(n, p, k) > a)
    };
    (lo, hi)
}

/// What an audit measured.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// the parameters and their exact worst-case bound
    pub setting: Setting,
    /// batches run
    pub trials: usize,
    /// batches a check flagged (detections; false alarms if the server is honest)
    pub detected: usize,
    /// batches accepted (escapes if the server cheats)
    pub accepted: usize,
    /// accepted / trials
    pub accept_rate: f64,
    /// its 99% Clopper-Pearson interval
    pub accept_interval_99: (f64, f64),
    /// detected / trials
    pub detect_rate: f64,
    /// its 99% Clopper-Pearson interval
    pub detect_interval_99: (f64, f64),
    /// detections per failed check
    pub by_check: BTreeMap<String, usize>,
    /// with --altered-rows K: the exact escape probability of altering exactly K rows
    #[serde(skip_serializing_if = "Option::is_none")]
    pub altered_rows: Option<usize>,
    /// its value
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escape_k_rows: Option<f64>,
    /// the interval's method
    pub interval: &'static str,
}

/// Runs `trials` batches of `b` random own inputs from `test` (indices `pool_len..`).
#[allow(clippy::too_many_arguments)]
pub async fn audit(
    client: &Client,
    info: &ServiceInfo,
    public: &PublicRows,
    test: &Dataset,
    b: usize,
    trials: usize,
    per_session: usize,
    opts: &FusionOptions,
    altered_rows: Option<usize>,
) -> Result<AuditReport, FusionError> {
    let setting = Setting::choose(opts.params, b, info.max_rows)?;
    let first_private = public.len().min(test.len().saturating_sub(1));
    let mut detected = 0;
    let mut by_check: BTreeMap<String, usize> = BTreeMap::new();
    let mut done = 0;
    while done < trials {
        let n = per_session.max(1).min(trials - done);
        let own: Vec<Vec<u8>> = {
            let mut rng = rand::rng();
            (0..n)
                .map(|_| {
                    (0..b)
                        .flat_map(|_| {
                            let i = rng.random_range(first_private..test.len());
                            test.image(i).unwrap_or_default().to_vec()
                        })
                        .collect()
                })
                .collect()
        };
        let refs: Vec<&[u8]> = own.iter().map(Vec::as_slice).collect();
        let s = run_sessions(client, info, public, &refs, opts).await?;
        for outcome in s.batches {
            match outcome {
                Ok(_) => {}
                Err(FusionError::Detected(c)) => {
                    detected += 1;
                    *by_check.entry(c.check_name().to_owned()).or_default() += 1;
                }
                Err(e) => return Err(e),
            }
        }
        done += n;
    }
    let accepted = trials - detected;
    let rate = |k: usize| {
        if trials == 0 {
            0.0
        } else {
            k as f64 / trials as f64
        }
    };
    let escape_k_rows =
        altered_rows.map(|k| tune::escape_rows(setting.t, setting.r, b, k).to_f64());
    Ok(AuditReport {
        setting,
        trials,
        detected,
        accepted,
        accept_rate: rate(accepted),
        accept_interval_99: clopper_pearson(accepted, trials, 0.99),
        detect_rate: rate(detected),
        detect_interval_99: clopper_pearson(detected, trials, 0.99),
        by_check,
        altered_rows,
        escape_k_rows,
        interval: "Clopper-Pearson (exact), two-sided 99%",
    })
}

/// The text report.
pub fn render(r: &AuditReport) -> String {
    use std::fmt::Write as _;
    let st = &r.setting;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Fusion audit: T = {}, R = {}, B = {} ({} rows per batch), {} batches",
        st.t, st.r, st.b, st.rows, r.trials
    );
    let _ = writeln!(
        s,
        "exact worst-case escape bound: {:.4e} = 2^{:.2}",
        st.escape, st.log2_escape
    );
    if let (Some(k), Some(e)) = (r.altered_rows, r.escape_k_rows) {
        let _ = writeln!(s, "exact escape probability altering {k} row(s): {e:.4e}");
    }
    let _ = writeln!(
        s,
        "detected: {} ({:.4}, 99% CI [{:.4}, {:.4}])   <- false alarms if the server is honest",
        r.detected, r.detect_rate, r.detect_interval_99.0, r.detect_interval_99.1
    );
    let _ = writeln!(
        s,
        "accepted: {} ({:.4}, 99% CI [{:.4}, {:.4}])   <- escapes if the server cheats",
        r.accepted, r.accept_rate, r.accept_interval_99.0, r.accept_interval_99.1
    );
    for (c, n) in &r.by_check {
        let _ = writeln!(s, "  check {c}: {n}");
    }
    let _ = writeln!(s, "interval: {}", r.interval);
    s
}

/// `fusion-client audit`.
pub async fn run_cmd(args: AuditArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let info = client.model_info().await?;
    let test = public_dataset(args.mnist_dir.as_deref())?;
    let public = PublicRows::fetch(&client, &info, &test).await?;
    let opts = args.fusion.options(crate::infer::InferOptions::default());
    let r = audit(
        &client,
        &info,
        &public,
        &test,
        args.batch,
        args.trials,
        args.per_session,
        &opts,
        args.altered_rows,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", render(&r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_matches_known_values() {
        // 0 of 10 at 99%: upper = 1 - 0.005^(1/10) = 0.41130
        let (lo, hi) = clopper_pearson(0, 10, 0.99);
        assert_eq!(lo, 0.0);
        assert!((hi - (1.0 - 0.005f64.powf(0.1))).abs() < 1e-9, "{hi}");
        // n of n is the mirror image
        let (lo, hi) = clopper_pearson(10, 10, 0.99);
        assert!((lo - 0.005f64.powf(0.1)).abs() < 1e-9 && hi == 1.0);
        // 5 of 10 at 95%: [0.187086, 0.812914] (standard tables)
        let (lo, hi) = clopper_pearson(5, 10, 0.95);
        assert!((lo - 0.187_086).abs() < 1e-5 && (hi - 0.812_914).abs() < 1e-5);
    }
}
