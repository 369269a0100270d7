//! Arrays in and out of the inference commands (`generate`, `bench infer`): initial latents from
//! `.npy`, images back as float32 NHWC values.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Initial latents from a float32 `(K, C, h, w)` `.npy`, with the image size they imply (`h·f`,
/// `w·f`; f: the VAE's down-sampling factor), which a given --height/--width must equal.
pub fn read_latents<B: Backend>(
    path: &Path,
    f: usize,
    height: Option<usize>,
    width: Option<usize>,
    device: &B::Device,
) -> Result<(Tensor<B, 4>, usize, usize)> {
    let l = blipd_data::npy::read_f32(path)
        .with_context(|| format!("reading the latents {}", path.display()))?;
    let [k, c, h, w] = <[usize; 4]>::try_from(l.shape.as_slice()).map_err(|_| {
        anyhow!(
            "{}: latents of shape {:?}; expected (K, 4, h, w) float32",
            path.display(),
            l.shape
        )
    })?;
    let (ph, pw) = (h * f, w * f);
    for (flag, given, implied) in [("--height", height, ph), ("--width", width, pw)] {
        if given.is_some_and(|g| g != implied) {
            bail!(
                "{flag} {} disagrees with the latents {}: ({k}, {c}, {h}, {w}) latents make {pw}×{ph} \
                 images (×{f}, the VAE's down-sampling factor); leave {flag} out or match it",
                given.unwrap_or(0),
                path.display()
            );
        }
    }
    if l.data.iter().any(|v| !v.is_finite()) {
        bail!("{}: the latents hold NaN or infinity", path.display());
    }
    let t = Tensor::<B, 4>::from_data(TensorData::new(l.data, [k, c, h, w]), device);
    Ok((t, ph, pw))
}

/// Images `[B, 3, H, W]` as float32 NHWC values and their dims `[B, H, W, 3]`.
pub fn nhwc_values<B: Backend>(images: Tensor<B, 4>) -> Result<(Vec<f32>, [usize; 4])> {
    let images = images.permute([0, 2, 3, 1]);
    let dims = images.dims();
    let data = images
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow!("reading the images back: {e:?}"))?;
    Ok((data, dims))
}
