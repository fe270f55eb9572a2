//! Critical points along lines (Carlini, Jagielski, Mironov, CRYPTO 2020, §4.1-4.2).
//!
//! Along a line x(t) = x0 + t u, t in [0, 1], the logits g(t) = f(x(t)) of a ReLU network
//! are piecewise linear; each kink is a critical point, where some neuron's input crosses
//! zero. The search, for many lines at once (one oracle batch per level):
//!
//! ```text
//! level 0: g at a uniform grid of `grid` points
//! a sample whose value deviates from the chord of its neighbours by more than the noise
//!   flags its two cells; flagged cells merge into regions, bounded by clean cells
//! a region: intersect the line through its left clean cell with the line through its
//!   right clean cell (least squares over the outputs) -> candidate t*
//! verify: query g(t*); it must lie on both lines (one kink)       -> critical point
//!   otherwise subdivide the region with 7 new samples and recurse (up to `max_depth`)
//! ```
//! Carlini et al. bisect on the deviation from linearity with exact outputs; here the
//! outputs are rounded (fixed point: multiples of 2^-f plus truncation inside), so every
//! test is against `noise` and slopes come from whole clean cells, never from tiny steps.

use super::super::oracle::{Oracle, OracleError, query_logits};
use rand::Rng;

/// x(t) = x0 + t u for t in [0, 1].
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub(crate) x0: Vec<f64>,
    pub(crate) u: Vec<f64>,
}

impl Line {
    /// A line between two random points of [0, 1]^d: each endpoint's coordinates are
    /// clamp(1.5 U - 0.25 + s) with U uniform and s a shift in [-0.3, 0.3] per endpoint
    /// (spread wider than uniform, a sixth of the mass on each face, some dark and some
    /// bright points), so that lines cross many hyperplanes, centred or not.
    pub(crate) fn random(rng: &mut impl Rng, d: usize) -> Self {
        let mut end = || {
            let shift: f64 = rng.random_range(-0.3..0.3);
            (0..d)
                .map(|_| (1.5 * rng.random::<f64>() - 0.25 + shift).clamp(0.0, 1.0))
                .collect::<Vec<f64>>()
        };
        let x0 = end();
        let x1 = end();
        let u = x1.iter().zip(&x0).map(|(b, a)| b - a).collect();
        Self { x0, u }
    }

    /// A line between two points near the attacker's own images: each endpoint is
    /// (1 - a) x + a U with x a random image of `images`, U uniform in [0, 1]^d and a
    /// uniform in [0, 0.6]. Networks trained on sparse images switch their neurons near
    /// such images, not around dense random points (where most first-layer neurons of an
    /// MNIST model are always on or always off); the noise term spreads the critical
    /// points over every pixel, border pixels included, for the hyperplane fits.
    pub(crate) fn near_images(rng: &mut impl Rng, images: &[Vec<f64>]) -> Option<Self> {
        let mut end = || -> Option<Vec<f64>> {
            let img = images.get(rng.random_range(0..images.len().max(1)))?;
            let a: f64 = rng.random_range(0.0..0.6);
            Some(
                img.iter()
                    .map(|&v| ((1.0 - a) * v + a * rng.random::<f64>()).clamp(0.0, 1.0))
                    .collect(),
            )
        };
        let x0 = end()?;
        let x1 = end()?;
        let u = x1.iter().zip(&x0).map(|(b, a)| b - a).collect();
        Some(Self { x0, u })
    }

    /// A line from `from` towards a corner of the cube where a random combination c of
    /// `dirs` (Gaussian weights, random sign) is smallest: the endpoint is (1 - a) k + a U
    /// with k_j = 1 where c_j < 0, else 0, U uniform and a uniform in [0, 0.5]. A neuron
    /// whose row lies in the span of `dirs` and that is on almost everywhere switches
    /// off on the way to such a corner.
    pub(crate) fn toward_corner(rng: &mut impl Rng, from: Vec<f64>, dirs: &[Vec<f64>]) -> Self {
        let d = from.len();
        let mut c = vec![0.0; d];
        for v in dirs {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            c.iter_mut().zip(v).for_each(|(a, b)| *a += g * b);
        }
        let a: f64 = rng.random_range(0.0..0.5);
        let x1: Vec<f64> = c
            .iter()
            .map(|&cj| {
                let k = if cj < 0.0 { 1.0 } else { 0.0 };
                ((1.0 - a) * k + a * rng.random::<f64>()).clamp(0.0, 1.0)
            })
            .collect();
        let u = x1.iter().zip(&from).map(|(b, a)| b - a).collect();
        Self { x0: from, u }
    }

    /// A line near the point `x` (a critical point): x + p - 2r to x + p + 2r (clamped),
    /// p and r Gaussian with standard deviation 0.15 per coordinate. If x lies on a
    /// neuron's hyperplane, the line crosses it at x + p + tau r with tau = -(w.p)/(w.r)
    /// (|tau| < 2 about 70% of the time): a new point of that plane, spread around x.
    pub(crate) fn around(rng: &mut impl Rng, x: &[f64]) -> Self {
        Self::around_with(rng, x, 0.15)
    }

    /// [`Line::around`] with standard deviation `sigma`.
    pub(crate) fn around_with(rng: &mut impl Rng, x: &[f64], sigma: f64) -> Self {
        let mut gauss = || {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let pr: Vec<(f64, f64)> = x.iter().map(|_| (gauss(), gauss())).collect();
        let x0: Vec<f64> = x
            .iter()
            .zip(&pr)
            .map(|(v, (p, r))| (v + p - 2.0 * r).clamp(0.0, 1.0))
            .collect();
        let x1: Vec<f64> = x
            .iter()
            .zip(&pr)
            .map(|(v, (p, r))| (v + p + 2.0 * r).clamp(0.0, 1.0))
            .collect();
        let u = x1.iter().zip(&x0).map(|(b, a)| b - a).collect();
        Self { x0, u }
    }

    /// The point x(t), clamped to [0, 1].
    pub(crate) fn at(&self, t: f64) -> Vec<f64> {
        self.x0
            .iter()
            .zip(&self.u)
            .map(|(a, u)| (a + t * u).clamp(0.0, 1.0))
            .collect()
    }
}

/// One critical point found along a line.
#[derive(Debug, Clone)]
pub(crate) struct Kink {
    /// the line's index
    pub(crate) line: usize,
    /// position on the line
    pub(crate) t: f64,
    /// slope (per unit t) after the kink minus slope before, one per output
    pub(crate) ds: Vec<f64>,
    /// whether `t` and `ds` come from least-squares fits of the whole linear pieces on
    /// both sides (precise) rather than from the two-sample anchor cells
    pub(crate) refined: bool,
}

/// Logits of points, through the oracle (in batches), as f64.
pub(crate) fn eval(
    oracle: &mut dyn Oracle,
    pts: &[Vec<f64>],
) -> Result<Vec<Vec<f64>>, OracleError> {
    let xs: Vec<Vec<f32>> = pts
        .iter()
        .map(|p| p.iter().map(|&v| v.clamp(0.0, 1.0) as f32).collect())
        .collect();
    query_logits(oracle, &xs).complete()
}

/// A sample g(t) on a line.
#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    g: Vec<f64>,
}

/// A region of one line still to be resolved: its samples (sorted by t), depth.
#[derive(Debug)]
struct Job {
    line: usize,
    samples: Vec<Sample>,
    depth: usize,
}

/// A candidate single kink of a region, waiting for its verification query.
#[derive(Debug)]
struct Candidate {
    line: usize,
    t: f64,
    left: (Vec<f64>, Vec<f64>),
    right: (Vec<f64>, Vec<f64>),
    region: Vec<Sample>,
    depth: usize,
}

/// Settings of the search.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SearchParams {
    pub(crate) grid: usize,
    pub(crate) max_depth: usize,
    pub(crate) noise: f64,
}

/// The outcome of scanning lines: critical points and the level-0 samples.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) kinks: Vec<Kink>,
    /// (line, t, logits) of the grid samples, for the least-squares fits later
    pub(crate) samples: Vec<(usize, f64, Vec<f64>)>,
    /// the noise scale used (the configured one or the one measured, if larger)
    pub(crate) noise: f64,
    /// the noise measured (half the median deviation of grid samples from their chords;
    /// about 0 for exact outputs, a few 2^-f for fixed point)
    pub(crate) measured: f64,
}

/// Finds the critical points along `lines` (indices `first..first + lines.len()`).
pub(crate) fn scan(
    oracle: &mut dyn Oracle,
    lines: &[Line],
    first: usize,
    p: SearchParams,
) -> Result<Scan, OracleError> {
    let n = p.grid.max(4);
    let ts: Vec<f64> = (0..n).map(|m| m as f64 / (n - 1) as f64).collect();
    let pts: Vec<Vec<f64>> = lines
        .iter()
        .flat_map(|l| ts.iter().map(move |&t| l.at(t)))
        .collect();
    let gs = eval(oracle, &pts)?;
    let mut out = Scan::default();
    // The noise actually seen: rounding of inputs and of every layer. Most grid samples
    // lie on a linear piece with their neighbours, so the median deviation from the chord
    // measures it (about twice the per-output deviation, for the max over 10 outputs).
    let mut devs: Vec<f64> = gs
        .chunks(n)
        .flat_map(|c| (1..c.len() - 1).map(move |m| chord_dev(&c[m - 1], &c[m], &c[m + 1], 0.5)))
        .collect();
    devs.sort_by(f64::total_cmp);
    let median = devs.get(devs.len() / 2).copied().unwrap_or(0.0);
    let p = SearchParams {
        noise: p.noise.max(0.5 * median),
        ..p
    };
    out.noise = p.noise;
    out.measured = 0.5 * median;
    let mut jobs = Vec::new();
    for (k, chunk) in gs.chunks(n).enumerate() {
        let samples: Vec<Sample> = ts
            .iter()
            .zip(chunk)
            .map(|(&t, g)| Sample { t, g: g.clone() })
            .collect();
        for s in &samples {
            out.samples.push((first + k, s.t, s.g.clone()));
        }
        jobs.push(Job {
            line: k,
            samples,
            depth: 0,
        });
    }
    while !jobs.is_empty() {
        let mut cands = Vec::new();
        for job in jobs.drain(..) {
            regions(&job, p.noise, &mut cands);
        }
        if cands.is_empty() {
            break;
        }
        let pts: Vec<Vec<f64>> = cands.iter().map(|c| lines[c.line].at(c.t)).collect();
        let gs = eval(oracle, &pts)?;
        let mut subdivide = Vec::new();
        for (c, g) in cands.into_iter().zip(gs) {
            let tol = 12.0 * p.noise;
            let on = |(a, s): &(Vec<f64>, Vec<f64>)| {
                a.iter()
                    .zip(s)
                    .zip(&g)
                    .all(|((a, s), v)| (a + s * c.t - v).abs() <= tol)
            };
            if on(&c.left) && on(&c.right) {
                let ds = c
                    .right
                    .1
                    .iter()
                    .zip(&c.left.1)
                    .map(|(r, l)| r - l)
                    .collect();
                out.kinks.push(Kink {
                    line: first + c.line,
                    t: c.t,
                    ds,
                    refined: false,
                });
            } else if c.depth < p.max_depth {
                subdivide.push(c);
            }
        }
        // Subdivide the unresolved regions: 7 new interior samples each.
        let mut new_pts = Vec::new();
        let mut plans = Vec::new();
        for c in subdivide {
            let (Some(first_s), Some(last_s)) = (c.region.first(), c.region.last()) else {
                continue;
            };
            let (a, b) = (first_s.t, last_s.t);
            let new_ts: Vec<f64> = (1..8).map(|i| a + (b - a) * i as f64 / 8.0).collect();
            for &t in &new_ts {
                new_pts.push(lines[c.line].at(t));
            }
            plans.push((c, new_ts));
        }
        if plans.is_empty() {
            break;
        }
        let gs = eval(oracle, &new_pts)?;
        let mut it = gs.into_iter();
        for (c, new_ts) in plans {
            let mut samples = c.region;
            for t in new_ts {
                if let Some(g) = it.next() {
                    samples.push(Sample { t, g });
                }
            }
            samples.sort_by(|x, y| x.t.total_cmp(&y.t));
            jobs.push(Job {
                line: c.line,
                samples,
                depth: c.depth + 1,
            });
        }
    }
    out.kinks
        .sort_by(|a, b| a.line.cmp(&b.line).then(a.t.total_cmp(&b.t)));
    refine_slopes(&mut out, first, p.noise);
    Ok(out)
}

/// Re-estimates each kink's slope change from the whole linear pieces on either side
/// (least squares over the grid samples strictly between neighbouring kinks), which is
/// far less noisy than the two-sample anchor cells; keeps the anchor estimate where a
/// piece has fewer than 3 samples or does not fit a line (a missed kink inside).
fn refine_slopes(out: &mut Scan, first: usize, noise: f64) {
    let samples = &out.samples;
    let mut i = 0;
    while i < out.kinks.len() {
        let line = out.kinks[i].line;
        let mut j = i;
        while j < out.kinks.len() && out.kinks[j].line == line {
            j += 1;
        }
        let line_samples: Vec<&(usize, f64, Vec<f64>)> =
            samples.iter().filter(|s| s.0 == line).collect();
        let ts: Vec<f64> = out.kinks[i..j].iter().map(|k| k.t).collect();
        for (k, kink) in out.kinks[i..j].iter_mut().enumerate() {
            let lo = if k == 0 { f64::NEG_INFINITY } else { ts[k - 1] };
            let hi = ts.get(k + 1).copied().unwrap_or(f64::INFINITY);
            let left = piece_line(&line_samples, lo, kink.t, noise);
            let right = piece_line(&line_samples, kink.t, hi, noise);
            if let (Some(l), Some(r)) = (left, right) {
                // The kink is where the two fitted lines meet (least squares over outputs).
                let (mut num, mut den) = (0.0, 0.0);
                for k in 0..l.0.len() {
                    let dc = r.0[k] - l.0[k];
                    let dsl = l.1[k] - r.1[k];
                    num += dc * dsl;
                    den += dsl * dsl;
                }
                let t = num / den;
                // Accept only a small move (within the resolution of the search).
                if den > 0.0 && (t - kink.t).abs() < 0.25 / samples_per_line(&line_samples) {
                    kink.t = t;
                    kink.ds = r.1.iter().zip(&l.1).map(|(a, b)| a - b).collect();
                    kink.refined = true;
                }
            }
        }
        i = j;
    }
    let _ = first;
}

fn samples_per_line(s: &[&(usize, f64, Vec<f64>)]) -> f64 {
    (s.len().max(2) - 1) as f64
}

/// The least-squares line (intercepts at t = 0, slopes) of the samples with lo < t < hi,
/// if at least 3 and they fit a line within the noise.
fn piece_line(
    s: &[&(usize, f64, Vec<f64>)],
    lo: f64,
    hi: f64,
    noise: f64,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let pts: Vec<&(usize, f64, Vec<f64>)> =
        s.iter().copied().filter(|x| x.1 > lo && x.1 < hi).collect();
    if pts.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    let tm = pts.iter().map(|x| x.1).sum::<f64>() / n;
    let stt: f64 = pts.iter().map(|x| (x.1 - tm).powi(2)).sum();
    let outputs = pts.first()?.2.len();
    let mut slopes = Vec::with_capacity(outputs);
    let mut intercepts = Vec::with_capacity(outputs);
    for c in 0..outputs {
        let ym = pts.iter().map(|x| x.2[c]).sum::<f64>() / n;
        let sty: f64 = pts.iter().map(|x| (x.1 - tm) * (x.2[c] - ym)).sum();
        let slope = sty / stt;
        let worst = pts
            .iter()
            .map(|x| (x.2[c] - ym - slope * (x.1 - tm)).abs())
            .fold(0.0, f64::max);
        if worst > 8.0 * noise {
            return None;
        }
        slopes.push(slope);
        intercepts.push(ym - slope * tm);
    }
    Some((intercepts, slopes))
}

/// Largest deviation over outputs of b from the chord a-c at fraction w.
fn chord_dev(a: &[f64], b: &[f64], c: &[f64], w: f64) -> f64 {
    a.iter()
        .zip(b)
        .zip(c)
        .map(|((x, y), z)| (y - (x * (1.0 - w) + z * w)).abs())
        .fold(0.0, f64::max)
}

/// The line through two samples: (intercept, slope) per output.
fn through(a: &Sample, b: &Sample) -> (Vec<f64>, Vec<f64>) {
    let dt = b.t - a.t;
    let s: Vec<f64> = a.g.iter().zip(&b.g).map(|(x, y)| (y - x) / dt).collect();
    let c = a.g.iter().zip(&s).map(|(x, s)| x - s * a.t).collect();
    (c, s)
}

/// Splits a job's samples into regions holding kinks and proposes one candidate each.
fn regions(job: &Job, noise: f64, out: &mut Vec<Candidate>) {
    let s = &job.samples;
    let n = s.len();
    if n < 4 {
        return;
    }
    // Deviation of each interior sample from the chord of its neighbours.
    let thr = 6.0 * noise;
    let mut flagged = vec![false; n];
    for m in 1..n - 1 {
        let (a, b, c) = (&s[m - 1], &s[m], &s[m + 1]);
        let w = (b.t - a.t) / (c.t - a.t);
        flagged[m] = chord_dev(&a.g, &b.g, &c.g, w) > thr;
    }
    // Regions: unions of [m-1, m+1] over flagged m.
    let mut m = 1;
    while m < n - 1 {
        if !flagged[m] {
            m += 1;
            continue;
        }
        let lo = m - 1;
        let mut hi = m + 1;
        while hi < n - 1 && flagged[hi] {
            hi += 1;
        }
        // Samples lo..=hi; the region's kinks lie in (t_lo, t_hi). Clean anchor cells
        // (lo-1, lo) and (hi, hi+1) are needed on both sides.
        if lo >= 1 && hi + 1 < n {
            let left = through(&s[lo - 1], &s[lo]);
            let right = through(&s[hi], &s[hi + 1]);
            // t minimising the squared gap between the two lines.
            let (mut num, mut den) = (0.0, 0.0);
            for k in 0..left.0.len() {
                let dc = right.0[k] - left.0[k];
                let dsl = left.1[k] - right.1[k];
                num += dc * dsl;
                den += dsl * dsl;
            }
            if den > 0.0 {
                let t = num / den;
                if t > s[lo].t && t < s[hi].t {
                    out.push(Candidate {
                        line: job.line,
                        t,
                        left,
                        right,
                        region: s[lo - 1..=hi + 1].to_vec(),
                        depth: job.depth,
                    });
                } else if job.depth + 1 < 8 {
                    // No single crossing inside: resolve by subdivision.
                    out.push(Candidate {
                        line: job.line,
                        t: 0.5 * (s[lo].t + s[hi].t),
                        left: (vec![f64::NAN], vec![f64::NAN]),
                        right: (vec![f64::NAN], vec![f64::NAN]),
                        region: s[lo - 1..=hi + 1].to_vec(),
                        depth: job.depth,
                    });
                }
            }
        }
        m = hi + 1;
    }
}
