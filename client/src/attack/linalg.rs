//! Small dense linear algebra in f64 for the extraction attack: Cholesky factorisation,
//! least squares through the normal equations, the smallest eigenvector of a symmetric
//! positive semi-definite matrix by inverse iteration. Matrices are row-major `Vec<f64>`
//! of n x n; products of large matrices go through ndarray.

use ndarray::{Array1, Array2, ArrayView2};

/// The Cholesky factor L (lower, row-major) of a symmetric positive definite `a` (n x n),
/// with `ridge` added to the diagonal; `None` if not positive definite.
pub(crate) fn cholesky(a: &Array2<f64>, ridge: f64) -> Option<Array2<f64>> {
    let n = a.nrows();
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[(i, j)] + if i == j { ridge } else { 0.0 };
            let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            s -= ri.iter().zip(rj).map(|(x, y)| x * y).sum::<f64>();
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Array2::from_shape_vec((n, n), l).ok()
}

/// Solves L L^T x = b for the Cholesky factor `l`.
pub(crate) fn cholesky_solve(l: &Array2<f64>, b: &Array1<f64>) -> Array1<f64> {
    let n = l.nrows();
    let lf = l
        .as_slice()
        .map(<[f64]>::to_vec)
        .unwrap_or_else(|| l.iter().copied().collect());
    let mut y = b.to_vec();
    for i in 0..n {
        let s: f64 = lf[i * n..i * n + i]
            .iter()
            .zip(&y[..i])
            .map(|(a, b)| a * b)
            .sum();
        y[i] = (y[i] - s) / lf[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= lf[k * n + i] * y[k];
        }
        y[i] = s / lf[i * n + i];
    }
    Array1::from(y)
}

/// Least squares: the `x` (columns of the result, one per column of `y`) minimising
/// |A x - y|^2, through the normal equations with a tiny relative ridge for stability.
/// `None` if A^T A is singular beyond repair.
pub(crate) fn least_squares(a: ArrayView2<'_, f64>, y: ArrayView2<'_, f64>) -> Option<Array2<f64>> {
    let ata = a.t().dot(&a);
    let aty = a.t().dot(&y);
    let scale = (0..ata.nrows()).map(|i| ata[(i, i)]).fold(0.0f64, f64::max);
    let l = cholesky(&ata, 1e-12 * scale.max(1e-300))?;
    let mut out = Array2::zeros((a.ncols(), y.ncols()));
    for c in 0..y.ncols() {
        let col = cholesky_solve(&l, &aty.column(c).to_owned());
        out.column_mut(c).assign(&col);
    }
    Some(out)
}

/// The unit eigenvector of the smallest eigenvalue of a symmetric positive semi-definite
/// `s`, by inverse iteration from `start` (a few steps: the gap is large when the points
/// lie near a hyperplane).
pub(crate) fn smallest_eigenvector(s: &Array2<f64>, start: &Array1<f64>) -> Option<Array1<f64>> {
    let scale = (0..s.nrows()).map(|i| s[(i, i)]).fold(0.0f64, f64::max);
    let l = cholesky(s, 1e-10 * scale.max(1e-300))?;
    let mut v = start.clone();
    normalise(&mut v)?;
    for _ in 0..6 {
        let mut next = cholesky_solve(&l, &v);
        normalise(&mut next)?;
        let close = next.dot(&v).abs() > 1.0 - 1e-15;
        v = next;
        if close {
            break;
        }
    }
    Some(v)
}

/// Scales `v` to unit norm; `None` if it is zero or not finite.
pub(crate) fn normalise(v: &mut Array1<f64>) -> Option<()> {
    let n = v.dot(v).sqrt();
    if !(n > 0.0 && n.is_finite()) {
        return None;
    }
    v.mapv_inplace(|x| x / n);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn least_squares_recovers_a_linear_map() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = Array2::from_shape_simple_fn((50, 6), || rng.random_range(-1.0..1.0));
        let x = Array2::from_shape_simple_fn((6, 2), || rng.random_range(-1.0..1.0));
        let y = a.dot(&x);
        let got = least_squares(a.view(), y.view()).unwrap();
        assert!((got - x).iter().all(|d| d.abs() < 1e-9));
    }

    #[test]
    fn smallest_eigenvector_is_the_normal_of_a_hyperplane() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let w = Array1::from(vec![0.6, -0.8, 0.0, 0.0]);
        // Points on the hyperplane w.x = 0, spread in the other directions.
        let mut s = Array2::<f64>::zeros((4, 4));
        for _ in 0..200 {
            let mut p = Array1::from_shape_simple_fn(4, || rng.random_range(-1.0..1.0));
            let d = p.dot(&w);
            p = p - &w * d;
            for i in 0..4 {
                for j in 0..4 {
                    s[(i, j)] += p[i] * p[j];
                }
            }
        }
        let v = smallest_eigenvector(&s, &Array1::from(vec![1.0, 1.0, 1.0, 1.0])).unwrap();
        assert!((v.dot(&w).abs() - 1.0).abs() < 1e-6);
    }
}
