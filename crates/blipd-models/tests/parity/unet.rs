//! U-Net parity against a tiny random diffusers `UNet2DConditionModel` (scripts/reference/gen_unet.py),
//! plus the attention hook's contract and the diffusers-layout save round trip.

use blipd_models::unet::{
    self, AttentionHook, AttentionKernel, AttentionSite, UNet2DConditionConfig,
    UNet2DConditionModel, UNetExtras, UNetPlace,
};
use blipd_models::weights::{ComponentDir, StateDict};
use burn::prelude::*;

use crate::common::{assert_close, device, fixture_dir, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn config() -> UNet2DConditionConfig {
    blipd_models::read_json(&fixture_dir("unet").join("config.json")).expect("fixture config")
}

fn model() -> UNet2DConditionModel<B> {
    let unet = config().init::<B>(&device()).expect("valid config");
    unet::load_state_dict(unet, weights("unet")).expect("weights fit through the key map")
}

#[test]
fn config_is_the_tiny_preset() {
    let c = config();
    let tiny = UNet2DConditionConfig::tiny();
    assert_eq!(c.block_out_channels, tiny.block_out_channels);
    assert_eq!(c.down_block_types, tiny.down_block_types);
    assert_eq!(c.up_block_types, tiny.up_block_types);
    assert_eq!(c.attention_head_dim, tiny.attention_head_dim);
    assert_eq!(c.cross_attention_dim, tiny.cross_attention_dim);
    assert_eq!(c.norm_num_groups, tiny.norm_num_groups);
}

#[test]
fn unet_time_embedding() {
    let unet = model();
    let io = io("unet");
    let t = tensor::<1>(&io, "timesteps");
    assert_close(
        "unet t_emb",
        unet.time_proj(t.clone(), 2),
        tensor(&io, "t_emb"),
        1e-5,
    );
    assert_close("unet emb", unet.time_embed(t, 2), tensor(&io, "emb"), TOL);
}

#[test]
fn unet_forward() {
    let unet = model();
    let io = io("unet");
    let out = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        None,
    );
    assert_close("unet out", out, tensor(&io, "out"), TOL);
}

#[test]
fn unet_forward_materialized_kernel() {
    let unet = model().with_attention_kernel(AttentionKernel::Materialized);
    let io = io("unet");
    let out = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        None,
    );
    assert_close(
        "unet out (materialized attention)",
        out,
        tensor(&io, "out"),
        TOL,
    );
}

#[test]
fn unet_odd_latent_size() {
    let unet = model();
    let io = io("unet");
    let out = unet.forward(
        tensor(&io, "odd_sample"),
        tensor(&io, "odd_timesteps"),
        tensor(&io, "odd_encoder"),
        None,
    );
    assert_eq!(out.dims(), [1, 4, 9, 7]);
    assert_close("unet odd 9x7", out, tensor(&io, "odd_out"), TOL);
}

#[test]
fn unet_controlnet_residuals() {
    let unet = model();
    let io = io("unet");
    assert_eq!(unet.num_down_residuals(), 4);
    let down: Vec<Tensor<B, 4>> = (0..4)
        .map(|i| tensor(&io, &format!("cn_down_{i}")))
        .collect();
    let out = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        Some(UNetExtras::residuals(down, tensor(&io, "cn_mid"))),
    );
    assert_close(
        "unet + controlnet residuals",
        out,
        tensor(&io, "cn_out"),
        TOL,
    );
}

/// Records every call; returns the probabilities unchanged.
#[derive(Default)]
struct Recorder {
    sites: Vec<AttentionSite>,
    shapes: Vec<[usize; 4]>,
    worst_row_sum_error: f32,
    forwards: Vec<usize>,
}

impl AttentionHook<B> for Recorder {
    fn on_attention(&mut self, site: &AttentionSite, probs: Tensor<B, 4>) -> Tensor<B, 4> {
        self.sites.push(*site);
        self.shapes.push(probs.dims());
        let err = (probs.clone().sum_dim(3) - 1.0).abs().max().into_scalar();
        self.worst_row_sum_error = self.worst_row_sum_error.max(err);
        probs
    }

    fn forward_done(&mut self, layers: usize) {
        self.forwards.push(layers);
    }
}

#[test]
fn attention_hook_sees_every_layer_and_identity_is_exact() {
    let unet = model();
    let io = io("unet");
    let mut rec = Recorder::default();
    let out = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        Some(UNetExtras::hook(&mut rec)),
    );
    assert_close(
        "unet out with identity hook",
        out.clone(),
        tensor(&io, "out"),
        TOL,
    );
    let plain = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        None,
    );
    assert_close("identity hook vs no hook", out, plain, 1e-5);

    // down_blocks.0: 1 transformer (self, cross); mid: 1; up_blocks.1: 2 → 8 calls.
    assert_eq!(unet.num_attention_layers(), 8);
    assert_eq!(rec.sites.len(), 8);
    assert_eq!(rec.forwards, vec![8]);
    let expect = [
        (UNetPlace::Down, 0, 0, false, 2, 16),
        (UNetPlace::Down, 0, 0, true, 2, 16),
        (UNetPlace::Mid, 0, 0, false, 4, 8),
        (UNetPlace::Mid, 0, 0, true, 4, 8),
        (UNetPlace::Up, 1, 0, false, 2, 16),
        (UNetPlace::Up, 1, 0, true, 2, 16),
        (UNetPlace::Up, 1, 1, false, 2, 16),
        (UNetPlace::Up, 1, 1, true, 2, 16),
    ];
    for (i, (site, (place, block, attention, is_cross, heads, side))) in
        rec.sites.iter().zip(expect).enumerate()
    {
        assert_eq!(site.index, i);
        assert_eq!(
            (
                site.place,
                site.block,
                site.attention,
                site.is_cross,
                site.heads
            ),
            (place, block, attention, is_cross, heads),
            "call {i}: {site:?}"
        );
        assert_eq!((site.height, site.width), (side, side));
        let keys = if is_cross { 77 } else { side * side };
        assert_eq!(site.key_len, keys);
        assert_eq!(rec.shapes[i], [2, heads, side * side, keys]);
    }
    assert!(
        rec.worst_row_sum_error < 1e-5,
        "{}",
        rec.worst_row_sum_error
    );
}

/// Replaces every cross-attention map by the uniform distribution over the text tokens.
struct UniformCross {
    calls: usize,
}

impl AttentionHook<B> for UniformCross {
    fn wants(&self, site: &AttentionSite) -> bool {
        site.is_cross
    }

    fn on_attention(&mut self, site: &AttentionSite, probs: Tensor<B, 4>) -> Tensor<B, 4> {
        assert!(site.is_cross, "wants() filters self-attention out");
        self.calls += 1;
        probs.zeros_like() + 1.0 / site.key_len as f64
    }
}

#[test]
fn replacing_hook_changes_the_output() {
    let unet = model();
    let io = io("unet");
    let mut hook = UniformCross { calls: 0 };
    let out = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        Some(UNetExtras::hook(&mut hook)),
    );
    assert_eq!(hook.calls, 4);
    let diff = (out - tensor::<4>(&io, "out")).abs().max().into_scalar();
    assert!(
        diff > 1e-3,
        "replacing cross-attention changed the output by only {diff}"
    );
}

/// Stand-in for LAVIS's store: only maps with ≤ 8² query pixels (the mid block here).
struct SmallMapsOnly {
    pixels: Vec<usize>,
    indices: Vec<usize>,
}

impl AttentionHook<B> for SmallMapsOnly {
    fn wants(&self, site: &AttentionSite) -> bool {
        site.query_pixels() <= 64
    }

    fn on_attention(&mut self, site: &AttentionSite, probs: Tensor<B, 4>) -> Tensor<B, 4> {
        self.pixels.push(site.query_pixels());
        self.indices.push(site.index);
        probs
    }
}

#[test]
fn hook_filter_skips_unwanted_layers() {
    let unet = model();
    let io = io("unet");
    let mut hook = SmallMapsOnly {
        pixels: vec![],
        indices: vec![],
    };
    let out = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        Some(UNetExtras::hook(&mut hook)),
    );
    assert_eq!(hook.pixels, vec![64, 64]);
    assert_eq!(
        hook.indices,
        vec![2, 3],
        "indices count the skipped layers too"
    );
    assert_close("unet out with filtered hook", out, tensor(&io, "out"), TOL);
}

#[test]
fn unet_saves_in_diffusers_layout() {
    let unet = model();
    let dir = std::env::temp_dir().join(format!("blipd-unet-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    unet.save_diffusers(&dir).expect("save");
    let saved = StateDict::read(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let reference = weights("unet");
    let ours: Vec<&String> = saved.keys().collect();
    let theirs: Vec<&String> = reference.keys().collect();
    assert_eq!(
        ours, theirs,
        "saved keys differ from diffusers' state_dict keys"
    );
    for k in ["conv_in.weight", "time_embedding.linear_1.weight"] {
        let a = saved.data(k).unwrap().to_vec::<f32>().unwrap();
        let b = reference.data(k).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(a, b, "{k}");
    }
    let reloaded = unet::load::<B>(
        &ComponentDir {
            name: "unet".into(),
            dir: dir.clone(),
        },
        &device(),
    )
    .expect("reload from the saved folder");
    let io = io("unet");
    let out = reloaded.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        None,
    );
    assert_close("unet reloaded", out, tensor(&io, "out"), TOL);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_weight_is_reported_by_name() {
    let mut sd = weights("unet");
    sd.drop_keys(|k| k == "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight");
    let unet = config().init::<B>(&device()).unwrap();
    let err = match unet::load_state_dict(unet, sd) {
        Ok(_) => panic!("loading with a missing tensor must fail"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("mid_block.attentions.0.transformer_blocks.0.ff.net_2.weight"),
        "{err}"
    );
}

#[test]
fn single_timestep_broadcasts_over_the_batch() {
    let unet = model();
    let io = io("unet");
    let dev = device();
    let run =
        |t: Tensor<B, 1>| unet.forward(tensor(&io, "sample"), t, tensor(&io, "encoder"), None);
    let one = run(Tensor::from_floats([250.0], &dev));
    let both = run(Tensor::from_floats([250.0, 250.0], &dev));
    assert_close("timestep [1] vs [B]", one, both, 0.0);
}
