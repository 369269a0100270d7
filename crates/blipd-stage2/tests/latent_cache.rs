//! Cached VAE moments (`blipd data encode-latents`): a step from the cache equals the online step for
//! the same noise, a stale cache is refused with the reason, and encoding resumes.

use blipd_data::synthetic::write_synthetic_shards;
use blipd_stage2::latents::{cache_key, encode_latents};
use blipd_stage2::run::{build, ShardSource, Source, Stage2RunConfig};
use blipd_stage2::{TargetPosterior, Targets};
use blipd_train::{parse_config, BatchSource};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

type B = blipd_testkit::CpuTrain;
type I = <B as AutodiffBackend>::InnerBackend;

fn config(
    run: &std::path::Path,
    shards: &std::path::Path,
    size: usize,
    cache: bool,
) -> Stage2RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 3\n[train]\nmax_steps = 1\nbatch_size = 3\nprogress = false\n\
         [optimizer]\nlr = 0.001\n[stage]\npreset = \"tiny\"\n\
         [data]\ntarget_size = {size}\nshards = {:?}\nlatent_cache = {cache}\n",
        run.display().to_string(),
        shards.display().to_string()
    );
    parse_config(&text, &[]).unwrap()
}

fn tensor<BB: Backend>(d: TensorData) -> Tensor<BB, 4> {
    Tensor::from_data(d, &Default::default())
}

#[test]
fn a_step_from_cached_moments_equals_the_online_step() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    write_synthetic_shards(&shards, 8, 5, 32, 4).unwrap();
    let device = Default::default();
    let cfg = config(&tmp.path().join("run"), &shards, 32, false);
    let (stage, model, src) = build::<B>(&cfg, &device).unwrap();
    let Source::Shards(mut online) = src else {
        panic!("a shards config gives a shard source")
    };
    let batch = online.next_batch().unwrap();
    let Targets::Pixels(pixels) = batch.target.clone() else {
        panic!("without a cache the targets are pixels")
    };

    let summary = encode_latents(
        &shards,
        &stage.vae,
        &stage.vae_config,
        32,
        3,
        &device,
        |_, _| {},
    )
    .unwrap();
    assert_eq!((summary.encoded, summary.pairs), (1, 8), "{summary:?}");

    let key = cache_key(&stage.vae, 32);
    let cfg_cached = config(&tmp.path().join("run"), &shards, 32, true);
    let mut cached = ShardSource::open(&shards, &cfg_cached, stage.image_size, Some(&key)).unwrap();
    let batch2 = cached.next_batch().unwrap();
    assert_eq!(
        batch2.subjects, batch.subjects,
        "the same pairs in the same order"
    );
    let Targets::Moments { mean, std } = batch2.target.clone() else {
        panic!("with a current cache the targets are moments")
    };

    // The cached posterior is the VAE's, pair for pair.
    let online_post = stage.vae.encode(tensor::<I>(pixels));
    blipd_testkit::assert_close(
        "cached mean vs the VAE's",
        tensor::<I>(mean.clone()),
        online_post.mean(),
        1e-6,
    );
    blipd_testkit::assert_close(
        "cached std vs the VAE's",
        tensor::<I>(std.clone()),
        online_post.std(),
        1e-6,
    );

    // One step's loss and gradients for the same timesteps and noise.
    let [b, c, h, w] = online_post.mean.dims();
    let noise_data = |seed: u64| {
        let mut s = seed;
        let v: Vec<f32> = (0..b * c * h * w)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        TensorData::new(v, [b, c, h, w])
    };
    let t = vec![10i64, 500, 999];
    let keep = vec![true, false, true];
    let step = |posterior: TargetPosterior<I>| {
        // The same dropout draws in the Q-Former for both passes.
        B::seed(&device, 11);
        let loss = stage
            .loss_from(
                &model,
                tensor::<B>(batch.input.clone()),
                posterior,
                &batch.subjects,
                &batch.captions,
                t.clone(),
                &keep,
                tensor::<I>(noise_data(1)),
                tensor::<B>(noise_data(2)),
            )
            .unwrap();
        let value = loss.clone().into_scalar();
        let grads = loss.backward();
        let g = model.unet.conv_in.weight.grad(&grads).unwrap();
        (value, g)
    };
    let (online_loss, online_grad) = step(online_post.into());
    let (cached_loss, cached_grad) = step(TargetPosterior::Cached {
        mean: tensor::<I>(mean),
        std: tensor::<I>(std),
    });
    println!("loss online {online_loss} vs cached {cached_loss}");
    assert!(online_loss.is_finite());
    assert!(
        (online_loss - cached_loss).abs() <= 1e-6 * online_loss.abs().max(1.0),
        "loss online {online_loss} vs cached {cached_loss}"
    );
    blipd_testkit::assert_close("U-Net conv_in gradient", cached_grad, online_grad, 1e-6);
}

#[test]
fn a_stale_cache_is_refused_and_encoding_resumes() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    write_synthetic_shards(&shards, 8, 5, 32, 4).unwrap();
    let device = Default::default();
    let (stage, _, _) = build::<B>(
        &config(&tmp.path().join("run"), &shards, 32, false),
        &device,
    )
    .unwrap();
    let enc = |size| {
        encode_latents(
            &shards,
            &stage.vae,
            &stage.vae_config,
            size,
            4,
            &device,
            |_, _| {},
        )
    };
    enc(32).unwrap();
    // Running it again keeps the current side files.
    let again = enc(32).unwrap();
    assert_eq!((again.encoded, again.skipped), (0, 1), "{again:?}");

    // Another target size: this run's key has no cache.
    let err = build::<B>(
        &config(&tmp.path().join("run16"), &shards, 16, true),
        &device,
    )
    .err()
    .expect("a cache for other sizes must be refused")
    .to_string();
    assert!(
        err.contains("32-pixel targets, this run uses 16") && err.contains("encode-latents"),
        "{err}"
    );
    // Turning the cache off trains from pixels.
    assert!(build::<B>(
        &config(&tmp.path().join("run16"), &shards, 16, false),
        &device
    )
    .is_ok());

    // Other VAE weights.
    let mut key = cache_key(&stage.vae, 32);
    key.vae_sha256 = "0".repeat(64);
    let cfg = config(&tmp.path().join("run"), &shards, 32, true);
    let err = ShardSource::open(&shards, &cfg, stage.image_size, Some(&key))
        .err()
        .expect("a cache for another VAE must be refused")
        .to_string();
    assert!(err.contains("VAE weights"), "{err}");

    // A shard whose bytes changed since (its manifest checksum no longer matches the cache's).
    let manifest_path = shards.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["shards"][0]["sha256"] = serde_json::Value::String("f".repeat(64));
    std::fs::write(&manifest_path, serde_json::to_string(&m).unwrap()).unwrap();
    let key = cache_key(&stage.vae, 32);
    let err = ShardSource::open(&shards, &cfg, stage.image_size, Some(&key))
        .err()
        .expect("a cache of other shard bytes must be refused")
        .to_string();
    assert!(err.contains("another version of shard"), "{err}");
}
