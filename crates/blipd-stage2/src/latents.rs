//! Cached VAE moments for stage 2 (`blipd data encode-latents`; the format is
//! [`blipd_data::moments`]).
//!
//! [`encode_latents`] runs the frozen VAE once over a shard folder's target images, preprocessed exactly
//! as stage 2 does ([`vae_target`]: shorter side to the target size, centre crop), and stores each
//! pair's posterior mean and std. A stage-2 run over that folder ([`crate::run::ShardSource`]) then
//! reads them instead of encoding targets on every step, and samples `mean + std·ε` with fresh noise
//! each step, as the online path does; a cache made with other VAE weights, another target size or
//! crop rule, or from other shard bytes is refused with the reason ([`cache_key`], `open_cache`).

use std::path::Path;

use blipd_data::moments::{self, MomentsIndex, MomentsKey, TARGET_CROP};
use blipd_data::shards::{Manifest, ShardReader};
use blipd_models::vae::{AutoencoderKL, VaeConfig};
use burn::prelude::*;

use crate::stage::vae_target;
use crate::Stage2Error;

/// SHA-256 of a VAE's parameters: each parameter's module path, shape and f32 little-endian values,
/// in module order. Identical weights give the same digest however they were loaded.
pub fn vae_sha256<B: Backend>(vae: &AutoencoderKL<B>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (path, t) in blipd_train::params::flat_params(vae) {
        h.update(path.as_bytes());
        h.update((t.dims()[0] as u64).to_le_bytes());
        let v = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 parameter");
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key of a stage-2 run: its VAE and target size, with stage 2's crop rule.
pub fn cache_key<B: Backend>(vae: &AutoencoderKL<B>, target_size: usize) -> MomentsKey {
    MomentsKey {
        vae_sha256: vae_sha256(vae),
        size: target_size,
        crop: TARGET_CROP.to_string(),
    }
}

/// What [`encode_latents`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeSummary {
    /// Short id of the cache's key (in the side files' names).
    pub key_id: String,
    /// Shards encoded now.
    pub encoded: usize,
    /// Shards whose side file was already current.
    pub skipped: usize,
    /// Pairs encoded now.
    pub pairs: u64,
}

/// Encodes every target of the shard folder `dir` with `vae` (configured by `vae_config`) at
/// `target_size` (a multiple of the VAE's down-sampling factor), `batch` images at a time, writing one side file per shard and
/// updating `moments.json` after each. Shards whose side file is current are skipped, so an
/// interrupted run continues where it stopped. `on_shard(done, total)` reports progress.
pub fn encode_latents<B: Backend>(
    dir: &Path,
    vae: &AutoencoderKL<B>,
    vae_config: &VaeConfig,
    target_size: usize,
    batch: usize,
    device: &B::Device,
    mut on_shard: impl FnMut(usize, usize),
) -> Result<EncodeSummary, Stage2Error> {
    let bad = |m: String| Stage2Error::Config(m);
    let (latent_channels, factor) = (vae_config.latent_channels, vae_config.downsample_factor());
    if batch == 0 {
        return Err(bad("encode-latents: --batch must be at least 1".into()));
    }
    if target_size == 0 || !target_size.is_multiple_of(factor) {
        return Err(bad(format!(
            "encode-latents: target size {target_size} must be a positive multiple of {factor} (the \
             VAE's down-sampling factor)"
        )));
    }
    let manifest = Manifest::load(dir)
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?
        .ok_or_else(|| {
            bad(format!(
                "{}: no manifest.json (is it a `blipd data synth` output folder?)",
                dir.display()
            ))
        })?;
    let key = cache_key(vae, target_size);
    let lat = target_size / factor;
    let latent_shape = [latent_channels, lat, lat];
    let mut index = MomentsIndex::load(dir)
        .map_err(|e| bad(e.to_string()))?
        .unwrap_or(MomentsIndex {
            format: moments::MOMENTS_FORMAT.into(),
            caches: Vec::new(),
        });
    let limits = blipd_data::imageio::ReadLimits::default();
    let mut summary = EncodeSummary {
        key_id: key.id(),
        encoded: 0,
        skipped: 0,
        pairs: 0,
    };
    let total = manifest.shards.len();
    for (done, shard) in manifest.shards.iter().enumerate() {
        let cache = index.cache_mut(&key, latent_shape);
        if cache
            .shards
            .iter()
            .any(|e| moments::is_current(dir, e, shard))
        {
            summary.skipped += 1;
            on_shard(done + 1, total);
            continue;
        }
        let path = dir.join(&shard.file);
        let records = ShardReader::open(&path)
            .and_then(|r| r.read_all())
            .map_err(|e| bad(e.to_string()))?;
        if records.len() as u64 != shard.rows {
            return Err(bad(format!(
                "{}: {} rows, the manifest says {}",
                path.display(),
                records.len(),
                shard.rows
            )));
        }
        let per = latent_shape.iter().product::<usize>();
        let mut mean = Vec::with_capacity(records.len() * per);
        let mut std = Vec::with_capacity(records.len() * per);
        for chunk in records.chunks(batch) {
            let mut pixels = Vec::with_capacity(chunk.len() * 3 * target_size * target_size);
            for rec in chunk {
                let img = blipd_data::imageio::decode_image(
                    &rec.target_image,
                    &format!("{} target", rec.image_id),
                    &limits,
                )
                .map_err(|e| bad(format!("{}: {e}", path.display())))?
                .to_rgb8();
                pixels.extend(vae_target(&img, target_size));
            }
            let x = Tensor::<B, 4>::from_data(
                TensorData::new(pixels, [chunk.len(), 3, target_size, target_size]),
                device,
            );
            let posterior = vae.encode(x);
            let read = |t: Tensor<B, 4>| -> Result<Vec<f32>, Stage2Error> {
                t.into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| bad(format!("reading latents back: {e:?}")))
            };
            mean.extend(read(posterior.mean())?);
            std.extend(read(posterior.std())?);
        }
        let entry = moments::write_shard(dir, shard, &key, latent_shape, &mean, &std)
            .map_err(|e| bad(e.to_string()))?;
        let cache = index.cache_mut(&key, latent_shape);
        cache.shards.retain(|e| e.index != shard.index);
        cache.shards.push(entry);
        cache.shards.sort_by_key(|e| e.index);
        index.save(dir).map_err(|e| bad(e.to_string()))?;
        summary.encoded += 1;
        summary.pairs += shard.rows;
        tracing::info!(
            "encode-latents: shard {} ({} pairs) → {}",
            shard.file,
            shard.rows,
            moments::file_name(shard, &key)
        );
        on_shard(done + 1, total);
    }
    Ok(summary)
}
