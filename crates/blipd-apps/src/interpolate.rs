//! Subject interpolation grids (BLIP-Diffusion fig. 9): the subject embeddings of 2–4 subjects
//! blended with bilinear weights and rendered in one context, every cell from the same initial noise,
//! so only the subject changes across the grid.
//!
//! The blend is LAVIS' multi-subject input ([`BlipDiffusionPipeline::mix_subject_embeddings`]: the
//! weighted sum of the `[1, Q, D]` embeddings, weights summing to 1). Layouts:
//! - 2 subjects: one row of `n` cells, A → B (weights `1 − t`, `t`, `t = i/(n−1)`);
//! - 3 subjects: `n × n`, A top-left, B top-right, C along the bottom row
//!   (`(1−x)(1−y)`, `x(1−y)`, `y`);
//! - 4 subjects: `n × n` bilinear, A top-left, B top-right, C bottom-left, D bottom-right.
//!
//! The corners are the subjects themselves: a corner cell is the zero-shot generation of that
//! subject alone (same prompt, seed and size).

use burn::prelude::*;

use crate::error::AppError;
use crate::generate::{BlipDiffusionPipeline, GenerateOptions};

/// The cells of an interpolation grid: `rows × cols` weight vectors (row-major), one weight per
/// subject, each summing to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct GridWeights {
    pub rows: usize,
    pub cols: usize,
    pub weights: Vec<Vec<f64>>,
}

/// The bilinear weights of `subjects` (2–4) on an `n`-cell side (module docs for the layouts).
pub fn grid_weights(subjects: usize, n: usize) -> Result<GridWeights, AppError> {
    if !(2..=4).contains(&subjects) {
        return Err(AppError::Request(format!(
            "interpolation blends 2 to 4 subjects, got {subjects}"
        )));
    }
    if !(2..=16).contains(&n) {
        return Err(AppError::Request(format!(
            "--steps-per-side must be 2..=16 (cells from one subject to the other), got {n}"
        )));
    }
    let t = |i: usize| i as f64 / (n - 1) as f64;
    let (rows, cols) = if subjects == 2 { (1, n) } else { (n, n) };
    let mut weights = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let (x, y) = (t(c), if rows == 1 { 0.0 } else { t(r) });
            weights.push(match subjects {
                2 => vec![1.0 - x, x],
                3 => vec![(1.0 - x) * (1.0 - y), x * (1.0 - y), y],
                _ => vec![(1.0 - x) * (1.0 - y), x * (1.0 - y), (1.0 - x) * y, x * y],
            });
        }
    }
    Ok(GridWeights {
        rows,
        cols,
        weights,
    })
}

/// Renders the grid: `ctxs` are the subjects' embeddings `[1, Q, D]` (in the layout's order),
/// `tgt_subject` the class word of the prompt, `batch` cells per denoising call. Returns the images
/// `[rows·cols, 3, H, W]` in `[0, 1]`, row-major.
pub fn interpolate<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    ctxs: &[Tensor<B, 3>],
    grid: &GridWeights,
    tgt_subject: &str,
    prompt: &str,
    opts: &GenerateOptions,
    batch: usize,
) -> Result<Tensor<B, 4>, AppError> {
    if grid.weights.first().map(Vec::len) != Some(ctxs.len()) {
        return Err(AppError::Request(format!(
            "{} subject embeddings for a grid of {} subjects",
            ctxs.len(),
            grid.weights.first().map_or(0, Vec::len)
        )));
    }
    let batch = batch.max(1);
    pipe.check_request(batch.min(grid.weights.len()), opts)?;
    // One noise for every cell: only the subject changes across the grid.
    let noise = pipe.initial_latents(1, opts);
    let mut out = Vec::with_capacity(grid.weights.len().div_ceil(batch));
    for cells in grid.weights.chunks(batch) {
        let mut mixed = Vec::with_capacity(cells.len());
        for w in cells {
            mixed.push(BlipDiffusionPipeline::<B>::mix_subject_embeddings(
                ctxs.to_vec(),
                w,
            )?);
        }
        let m = cells.len();
        let result = pipe.generate_with_ctx(
            Tensor::cat(mixed, 0),
            &vec![tgt_subject; m],
            &vec![prompt; m],
            opts,
            Some(noise.clone().repeat_dim(0, m)),
            &mut |_| {},
        )?;
        out.push(result.images);
    }
    Ok(Tensor::cat(out, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_bilinear_sum_to_one_and_put_the_subjects_at_the_corners() {
        let g = grid_weights(2, 5).unwrap();
        assert_eq!((g.rows, g.cols), (1, 5));
        assert_eq!(g.weights[0], vec![1.0, 0.0]);
        assert_eq!(g.weights[2], vec![0.5, 0.5]);
        assert_eq!(g.weights[4], vec![0.0, 1.0]);
        for s in [3, 4] {
            let g = grid_weights(s, 3).unwrap();
            assert_eq!((g.rows, g.cols, g.weights.len()), (3, 3, 9));
            for w in &g.weights {
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
                assert!(w.iter().all(|&x| (0.0..=1.0).contains(&x)), "{w:?}");
            }
            let one_hot = |i: usize| (0..s).map(|j| (i == j) as u8 as f64).collect::<Vec<_>>();
            assert_eq!(g.weights[0], one_hot(0));
            assert_eq!(g.weights[2], one_hot(1));
            assert_eq!(g.weights[6], one_hot(2));
            assert_eq!(g.weights[8], one_hot(s - 1));
            // The centre blends every subject.
            assert!(g.weights[4].iter().all(|&x| x > 0.0), "{:?}", g.weights[4]);
        }
        assert!(grid_weights(1, 3).is_err());
        assert!(grid_weights(5, 3).is_err());
        assert!(grid_weights(2, 1).is_err());
    }
}
