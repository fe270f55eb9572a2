//! From critical points to a model (Carlini, Jagielski, Mironov, CRYPTO 2020, §4.2-4.4,
//! adapted to rounded outputs).
//!
//! - Grouping: in a network with one hidden layer, crossing neuron i along any line
//!   changes the slope of the logits by A2[:, i] (w_i . u): the direction of that change
//!   (up to sign) names the neuron. Critical points are grouped greedily by it.
//! - First layer up to scale: the critical points of neuron i lie on its hyperplane
//!   w_i . x + b_i = 0. With many such points spread over the cube, (w_i, b_i) is the
//!   normal of their best-fitting hyperplane (total least squares: the eigenvector of the
//!   smallest eigenvalue of their scatter matrix). This replaces the paper's finite
//!   differences at one critical point, whose precision is bounded by the size of the
//!   linear region around it (tiny in 784 dimensions against outputs rounded to 2^-12),
//!   with a baseline as wide as the cube: the error per row falls as 1/sqrt(points).
//!   Points are then re-assigned to the hyperplane they lie on and outliers dropped.
//! - Signs: relu(-z) = relu(z) - z, so with hyperplanes known up to sign the logits are
//!   f(x) = sum_i a_i relu(z_i) + sum_i beta_i z_i + c with beta_i = 0 (sign right) or
//!   beta_i = -a_i (sign wrong): one least-squares fit decides every sign at once, in
//!   polynomial time (the 2^n search of the paper collapses because the output layer is
//!   linear).
//! - Last layer: least squares of the logits on relu(z_i) and 1.

use super::super::linalg::{least_squares, smallest_eigenvector};
use ndarray::{Array1, Array2};

/// A first-layer neuron as recovered: unit normal `w` and offset `b`, up to sign until
/// the signs are fixed.
#[derive(Debug, Clone)]
pub(crate) struct Hyperplane {
    pub(crate) w: Array1<f64>,
    pub(crate) b: f64,
    /// critical points assigned to it
    pub(crate) points: Vec<usize>,
    /// the signature direction (unit)
    pub(crate) sig: Vec<f64>,
    /// root mean square distance of its points to the plane (input units)
    pub(crate) rms: f64,
}

impl Hyperplane {
    /// w . x + b (a signed distance, w being unit).
    pub(crate) fn z(&self, x: &[f64]) -> f64 {
        self.w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + self.b
    }
}

/// A unit signature with a canonical sign (the largest component positive).
pub(crate) fn signature(ds: &[f64]) -> Option<Vec<f64>> {
    let n = ds.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(n > 0.0 && n.is_finite()) {
        return None;
    }
    let big = ds
        .iter()
        .copied()
        .fold(0.0f64, |m, v| if v.abs() > m.abs() { v } else { m });
    let s = if big < 0.0 { -1.0 } else { 1.0 };
    Some(ds.iter().map(|v| s * v / n).collect())
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Greedy grouping of signatures: a signature joins the first group whose mean direction
/// is within `min_cos` (absolute cosine), else starts a new group (at most `max_groups`:
/// when full, groups of at most two points are dropped). Returns per group the member
/// indices and the mean direction.
pub(crate) fn group(
    sigs: &[(usize, Vec<f64>)],
    min_cos: f64,
    max_groups: usize,
) -> Vec<(Vec<usize>, Vec<f64>)> {
    let mut groups: Vec<(Vec<usize>, Vec<f64>)> = Vec::new();
    group_into(&mut groups, sigs, min_cos, max_groups);
    groups
}

/// Adds signatures to existing groups (as [`group`]).
pub(crate) fn group_into(
    groups: &mut Vec<(Vec<usize>, Vec<f64>)>,
    sigs: &[(usize, Vec<f64>)],
    min_cos: f64,
    max_groups: usize,
) {
    for (i, s) in sigs {
        if groups.len() >= max_groups {
            // Make room for neurons first seen late: drop the groups of one or two
            // points (noise, or points of neurons that will come back).
            groups.retain(|g| g.0.len() > 2);
        }
        let full = groups.len() >= max_groups;
        let best = groups
            .iter_mut()
            .map(|g| {
                let c = cos(&g.1, s);
                (c.abs(), c.signum(), g)
            })
            .filter(|(c, _, _)| *c >= min_cos)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((_, sign, g)) => {
                let k = g.0.len() as f64;
                for (m, v) in g.1.iter_mut().zip(s) {
                    *m = (*m * k + sign * v) / (k + 1.0);
                }
                let n = g.1.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-300);
                g.1.iter_mut().for_each(|v| *v /= n);
                g.0.push(*i);
            }
            None if !full => groups.push((vec![*i], s.clone())),
            None => {}
        }
    }
}

/// The hyperplane best fitting `points` (rows): unit normal and offset, and the rms
/// distance of the points to it. `None` if there are fewer points than d + 1 or the fit
/// fails.
pub(crate) fn fit_plane(
    points: &[&[f64]],
    start: Option<&Array1<f64>>,
) -> Option<(Array1<f64>, f64, f64)> {
    let d = points.first()?.len();
    if points.len() <= d {
        return None;
    }
    let m = points.len();
    let mut x = Array2::<f64>::zeros((m, d));
    for (mut row, p) in x.rows_mut().into_iter().zip(points) {
        row.assign(&Array1::from(p.to_vec()));
    }
    let mean = x.mean_axis(ndarray::Axis(0))?;
    x -= &mean;
    let s = x.t().dot(&x);
    let init = match start {
        Some(w) => w.clone(),
        None => Array1::from_shape_fn(d, |j| 1.0 + 0.01 * j as f64),
    };
    let w = smallest_eigenvector(&s, &init)?;
    let b = -w.dot(&mean);
    let r = x.dot(&w);
    let rms = (r.dot(&r) / m as f64).sqrt();
    Some((w, b, rms))
}

/// Features for the last-layer fits: relu(z_i) for every plane, then (if `linear`) z_i,
/// then 1.
pub(crate) fn features(
    planes: &[Hyperplane],
    signs: &[f64],
    xs: &[Vec<f64>],
    linear: bool,
) -> Array2<f64> {
    let k = planes.len();
    let cols = if linear { 2 * k + 1 } else { k + 1 };
    let mut a = Array2::<f64>::zeros((xs.len(), cols));
    for (mut row, x) in a.rows_mut().into_iter().zip(xs) {
        for (i, (p, s)) in planes.iter().zip(signs).enumerate() {
            let z = s * p.z(x);
            row[i] = z.max(0.0);
            if linear {
                row[k + i] = z;
            }
        }
        row[cols - 1] = 1.0;
    }
    a
}

/// Decides each plane's sign from one least-squares fit of the logits `ys` on relu(z_i),
/// z_i and 1: the sign is wrong where the coefficient of z_i is closer to -a_i than to 0.
/// Returns the signs and, per plane, a confidence ratio (the distance to the rejected
/// hypothesis over the distance to the chosen one).
pub(crate) fn signs(
    planes: &[Hyperplane],
    xs: &[Vec<f64>],
    ys: &Array2<f64>,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let k = planes.len();
    let ones = vec![1.0; k];
    let a = features(planes, &ones, xs, true);
    let coef = least_squares(a.view(), ys.view())?;
    let mut signs = Vec::with_capacity(k);
    let mut conf = Vec::with_capacity(k);
    for i in 0..k {
        let ai = coef.row(i);
        let bi = coef.row(k + i);
        let keep: f64 = bi.iter().map(|v| v * v).sum::<f64>().sqrt();
        let flip: f64 = bi
            .iter()
            .zip(ai.iter())
            .map(|(b, a)| (b + a).powi(2))
            .sum::<f64>()
            .sqrt();
        signs.push(if keep <= flip { 1.0 } else { -1.0 });
        conf.push(keep.max(flip) / keep.min(flip).max(1e-300));
    }
    Some((signs, conf))
}

/// A first-layer unit: its row and bias.
pub(crate) type Unit = (Vec<f64>, f64);

/// The last layer when `free` hidden units were not found: least squares of the logits
/// on relu(z_i), x and 1, its linear part turned into always-active units by
/// [`linear_units`] (inputs in [0, 1]^d). Returns the output layer
/// (`[h + units + 1, classes]`) and the units' (row, bias).
pub(crate) fn with_linear_part(
    planes: &[Hyperplane],
    signs: &[f64],
    xs: &[Vec<f64>],
    ys: &Array2<f64>,
    free: usize,
) -> Option<(Array2<f64>, Vec<Unit>)> {
    let k = planes.len();
    let d = xs.first()?.len();
    let base = features(planes, signs, xs, false);
    let mut a = Array2::<f64>::zeros((xs.len(), k + d + 1));
    for (r, x) in xs.iter().enumerate() {
        for i in 0..k {
            a[(r, i)] = base[(r, i)];
        }
        for (j, &v) in x.iter().enumerate() {
            a[(r, k + j)] = v;
        }
        a[(r, k + d)] = 1.0;
    }
    let coef = least_squares(a.view(), ys.view())?;
    Some(linear_units(&coef, k, free, &vec![1.0; d]))
}

/// The output layer with `free` always-active units in place of the linear part of a fit:
/// `coef` holds the least squares of the logits on [k ReLU features, the layer's n =
/// `xmax.len()` inputs, 1]; its linear part L (classes x n) is approximated with rank
/// `free` (power iteration on L L^T, deflated), each component sigma u v^T becoming a unit:
/// row v (unit), bias sum |v_j| xmax_j + 1 (so v.x + bias >= 1 wherever 0 <= x_j <=
/// xmax_j), output column sigma u, and the output bias corrected by -sigma u bias. Returns
/// the output layer (`[k + units + 1, classes]`) and the units' (row, bias).
pub(crate) fn linear_units(
    coef: &Array2<f64>,
    k: usize,
    free: usize,
    xmax: &[f64],
) -> (Array2<f64>, Vec<Unit>) {
    let d = xmax.len();
    let classes = coef.ncols();
    // L = coef[k..k+d, :]^T, classes x d.
    let mut l = Array2::from_shape_fn((classes, d), |(c, j)| coef[(k + j, c)]);
    let mut units = Vec::new();
    let mut cols = Vec::new();
    let mut bias: Vec<f64> = (0..classes).map(|c| coef[(k + d, c)]).collect();
    for _ in 0..free {
        let m = l.dot(&l.t());
        let mut u = Array1::from_elem(classes, 1.0);
        for _ in 0..200 {
            let next = m.dot(&u);
            let n = next.dot(&next).sqrt();
            if n <= 1e-300 {
                break;
            }
            u = next / n;
        }
        let v = l.t().dot(&u);
        let sigma = v.dot(&v).sqrt();
        if sigma <= 1e-9 {
            break;
        }
        let v = v / sigma;
        let beta = v.iter().zip(xmax).map(|(a, x)| a.abs() * x).sum::<f64>() + 1.0;
        for c in 0..classes {
            bias[c] -= sigma * u[c] * beta;
            for j in 0..d {
                l[(c, j)] -= sigma * u[c] * v[j];
            }
        }
        units.push((v.to_vec(), beta));
        cols.push(u * sigma);
    }
    let h = k + units.len();
    let mut out = Array2::<f64>::zeros((h + 1, classes));
    for i in 0..k {
        out.row_mut(i).assign(&coef.row(i));
    }
    for (i, col) in cols.iter().enumerate() {
        out.row_mut(k + i).assign(col);
    }
    for c in 0..classes {
        out[(h, c)] = bias[c];
    }
    (out, units)
}
