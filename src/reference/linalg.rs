//! Dense f64 matrix products, parallel over output rows: the shrink and expand of the model.

use rayon::prelude::*;

/// `C [m, n] = A [m, k] · B [k, n]`, all row-major f64.
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(b.len(), k * n);
    let mut c = vec![0.0; m * n];
    if n == 0 {
        return c;
    }
    c.par_chunks_mut(n).zip(a.par_chunks(k.max(1))).for_each(|(c_row, a_row)| {
        for (i, &a_ik) in a_row.iter().enumerate().take(k) {
            if a_ik != 0.0 {
                for (c_j, &b_ij) in c_row.iter_mut().zip(&b[i * n..(i + 1) * n]) {
                    *c_j += a_ik * b_ij;
                }
            }
        }
    });
    c
}

/// `Aᵀ [n, m]` of `A [m, n]`, row-major (the backward's products take transposed operands).
pub fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    debug_assert_eq!(a.len(), m * n);
    (0..n).flat_map(|j| (0..m).map(move |i| a[i * n + j])).collect()
}

/// Shrink: `h [T, R] = x [T, d_in] · A [d_in, R]`.
pub fn shrink(x: &[f64], a: &[f64], tokens: usize, d_in: usize, rank: usize) -> Vec<f64> {
    matmul(x, a, tokens, d_in, rank)
}

/// Expand: `y [T, d_out] + scale · h' [T, R] · B [R, d_out]`.
pub fn expand(h_mixed: &[f64], b: &[f64], y: &[f64], scale: f64, tokens: usize, rank: usize, d_out: usize) -> Vec<f64> {
    let delta = matmul(h_mixed, b, tokens, rank, d_out);
    y.iter().zip(delta).map(|(&y, d)| y + scale * d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_hand_computed() {
        // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
        assert_eq!(matmul(&[1., 2., 3., 4.], &[5., 6., 7., 8.], 2, 2, 2), vec![19., 22., 43., 50.]);
        // [1 2 3] · [1; 0; -1] = [-2]
        assert_eq!(matmul(&[1., 2., 3.], &[1., 0., -1.], 1, 3, 1), vec![-2.]);
        assert_eq!(transpose(&[1., 2., 3., 4., 5., 6.], 2, 3), vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(expand(&[1., 2.], &[1., 1., 1., -1.], &[10., 20.], 0.5, 1, 2, 2), vec![11.5, 19.5]);
    }
}
