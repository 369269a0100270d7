//! LoRA parity against PEFT on the tiny U-Net (scripts/reference/gen_lora.py): a PEFT adapter folder
//! (r = 4, lora_alpha = 8) and the diffusers-layout file (alpha folded, proven there to load in
//! diffusers), unmerged and fused, at weight 1 and 0.5; the layout blipd writes; fresh adapters;
//! and the errors of files that do not fit.

use blipd_models::lora::{self, ApplyMode, LoraSpec, LoraWeights};
use blipd_models::unet::{self, UNet2DConditionConfig, UNet2DConditionModel};
use blipd_models::weights::{write_safetensors, StateDict};
use burn::module::AutodiffModule;
use burn::prelude::*;

use crate::common::{assert_close, device, fixture_dir, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn base() -> UNet2DConditionModel<B> {
    let config: UNet2DConditionConfig =
        blipd_models::read_json(&fixture_dir("unet").join("config.json")).unwrap();
    unet::load_state_dict(config.init::<B>(&device()).unwrap(), weights("unet")).unwrap()
}

fn run(unet: &UNet2DConditionModel<B>) -> Tensor<B, 4> {
    let io = io("lora");
    unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        None,
    )
}

fn peft() -> LoraWeights {
    LoraWeights::read(&fixture_dir("lora").join("adapter")).expect("PEFT folder")
}

fn diffusers_file() -> LoraWeights {
    LoraWeights::read(&fixture_dir("lora").join(lora::LORA_FILE)).expect("diffusers file")
}

#[test]
fn reads_both_layouts() {
    let (p, d) = (peft(), diffusers_file());
    assert_eq!(
        p.modules.len(),
        32,
        "4 transformer blocks × 2 attentions × 4 projections"
    );
    assert_eq!(p.rank(), 4);
    assert!(
        p.modules.values().all(|m| m.scale == 2.0),
        "lora_alpha 8 / r 4 from adapter_config.json"
    );
    assert!(
        d.modules.values().all(|m| m.scale == 1.0),
        "diffusers files carry no alpha"
    );
    assert_eq!(
        p.modules.keys().collect::<Vec<_>>(),
        d.modules.keys().collect::<Vec<_>>()
    );
}

#[test]
fn peft_unmerged_and_fused_match_peft() {
    let expected = tensor::<4>(&io("lora"), "out");
    let base_out = run(&base());
    assert_close(
        "lora base",
        base_out.clone(),
        tensor(&io("lora"), "base_out"),
        TOL,
    );
    // Not a vacuous comparison: the adapter moves the output far more than the tolerance.
    let moved = (expected.clone() - base_out).abs().max().into_scalar();
    assert!(moved > 0.1, "adapter effect {moved}");
    for mode in [ApplyMode::Adapters, ApplyMode::Fuse] {
        let unet = lora::apply(base(), &peft(), 1.0, mode, &device()).unwrap();
        assert_close(
            &format!("lora peft {mode:?}"),
            run(&unet),
            expected.clone(),
            TOL,
        );
        let unet = lora::apply(base(), &diffusers_file(), 1.0, mode, &device()).unwrap();
        assert_close(
            &format!("lora diffusers {mode:?}"),
            run(&unet),
            expected.clone(),
            TOL,
        );
        let unet = lora::apply(base(), &peft(), 0.5, mode, &device()).unwrap();
        assert_close(
            &format!("lora weight 0.5 {mode:?}"),
            run(&unet),
            tensor(&io("lora"), "out_half"),
            TOL,
        );
    }
}

#[test]
fn writes_the_diffusers_layout() {
    // PEFT's adapter attached unmerged, written by blipd: the diffusers file of the fixture, which
    // gen_lora.py loaded into diffusers and checked against PEFT.
    let unet = lora::apply(base(), &peft(), 1.0, ApplyMode::Adapters, &device()).unwrap();
    let ours = lora::adapter_tensors(&unet);
    let theirs = StateDict::read(&fixture_dir("lora").join(lora::LORA_FILE)).unwrap();
    let keys: Vec<&String> = ours.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, theirs.keys().collect::<Vec<_>>());
    for (k, data) in ours {
        let want = theirs.data(&k).unwrap().convert::<f32>();
        assert_eq!(data.shape, want.shape, "{k}");
        blipd_testkit::assert_close_slice(
            &k,
            data.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap(),
            1e-6,
        );
    }
    // And merging the attached adapters equals running them unmerged.
    let unmerged = run(&unet);
    assert_close("lora merged", run(&lora::merge(unet)), unmerged, TOL);
}

#[test]
fn fresh_adapters_start_at_the_base_and_alone_get_gradients() {
    type AD = burn::backend::Autodiff<B>;
    let dev = device();
    let config: UNet2DConditionConfig =
        blipd_models::read_json(&fixture_dir("unet").join("config.json")).unwrap();
    let frozen = unet::load_state_dict(config.init::<AD>(&dev).unwrap(), weights("unet")).unwrap();
    let unet = lora::attach(frozen.no_grad(), &LoraSpec::new(2), &dev).unwrap();
    assert!(lora::has_adapters(&unet));
    let io = io("lora");
    let fwd = |u: &UNet2DConditionModel<AD>| {
        u.forward(
            Tensor::from_data(io.data("sample").unwrap().convert::<f32>(), &dev),
            Tensor::from_data(io.data("timesteps").unwrap().convert::<f32>(), &dev),
            Tensor::from_data(io.data("encoder").unwrap().convert::<f32>(), &dev),
            None,
        )
    };
    let out = fwd(&unet);
    // lora_B starts at zero: exactly the base model.
    blipd_testkit::assert_close(
        "fresh lora = base",
        out.clone().inner(),
        tensor::<4>(&io, "base_out"),
        TOL as f64,
    );
    let grads = out.powi_scalar(2).mean().backward();
    let attn = &unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2;
    assert!(
        attn.to_k.weight.grad(&grads).is_none(),
        "the base is frozen"
    );
    let l = attn.lora.as_ref().unwrap().to_k.as_ref().unwrap();
    let g = l.up.weight.grad(&grads).expect("lora_B gets a gradient");
    assert!(g.abs().sum().into_scalar() > 0.0);
    let n: usize = lora::adapter_tensors(&unet)
        .iter()
        .map(|(_, d)| d.num_elements())
        .sum();
    assert_eq!(
        n,
        peft().num_params() / 2,
        "rank 2 is half the fixture's rank 4"
    );
    // A U-Net with adapters is not saved as if it were a plain one.
    let e = unet
        .valid()
        .save_diffusers(&std::env::temp_dir().join("blipd-lora-refused"))
        .unwrap_err();
    assert!(e.to_string().contains("LoRA adapters"), "{e}");
}

fn write(dir: &std::path::Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> std::path::PathBuf {
    let path = dir.join(name);
    let t: Vec<(String, TensorData)> = tensors
        .iter()
        .map(|(k, shape)| {
            let n = shape.iter().product();
            (
                k.to_string(),
                TensorData::new(vec![0.1f32; n], shape.clone()),
            )
        })
        .collect();
    write_safetensors(&path, &t, None).unwrap();
    path
}

#[test]
fn files_that_do_not_fit_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("blipd-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let err = |p: &std::path::Path| LoraWeights::read(p).unwrap_err().to_string();

    // A LoRA for another network: the fixture's adapter on a U-Net of other widths.
    let micro = UNet2DConditionConfig::micro().init::<B>(&device()).unwrap();
    let e = lora::apply(micro, &peft(), 1.0, ApplyMode::Fuse, &device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit this U-Net"), "{e}");
    // A module the U-Net does not have.
    let p = write(
        &dir,
        "ff.safetensors",
        &[
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.lora_A.weight",
                vec![4, 64],
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.lora_B.weight",
                vec![16, 4],
            ),
        ],
    );
    let w = LoraWeights::read(&p).unwrap();
    let e = lora::apply(base(), &w, 1.0, ApplyMode::Fuse, &device())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ff.net.2` is not an attention projection"),
        "{e}"
    );
    // Text encoder, Kohya names, half an adapter, something else, nothing.
    let p = write(
        &dir,
        "te.safetensors",
        &[("text_encoder.x.lora_A.weight", vec![4, 8])],
    );
    assert!(err(&p).contains("text encoder"));
    let p = write(
        &dir,
        "kohya.safetensors",
        &[("lora_unet_down_blocks_0.lora_down.weight", vec![4, 8])],
    );
    assert!(err(&p).contains("Kohya"));
    let p = write(
        &dir,
        "half.safetensors",
        &[(&format!("{q}.lora_A.weight"), vec![4, 16])],
    );
    assert!(err(&p).contains("has lora_A but no lora_B"), "{}", err(&p));
    let p = write(&dir, "other.safetensors", &[("conv_in.weight", vec![4, 4])]);
    assert!(err(&p).contains("is not a LoRA key"));
    let p = write(
        &dir,
        "swapped.safetensors",
        &[
            (&format!("{q}.lora_A.weight"), vec![16, 4]),
            (&format!("{q}.lora_B.weight"), vec![16, 4]),
        ],
    );
    assert!(
        err(&p).contains("are not (r, in) and (out, r)"),
        "{}",
        err(&p)
    );
    assert!(err(&dir.join("missing.safetensors")).contains("no such file"));
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(err(&empty).contains("no pytorch_lora_weights.safetensors"));
    // Per-module alpha entries set the scale.
    let p = write(
        &dir,
        "alpha.safetensors",
        &[
            (&format!("{q}.lora_A.weight"), vec![4, 16]),
            (&format!("{q}.lora_B.weight"), vec![16, 4]),
            (&format!("{q}.alpha"), vec![1]),
        ],
    );
    let w = LoraWeights::read(&p).unwrap();
    assert!((w.modules.values().next().unwrap().scale - 0.1 / 4.0).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).ok();
}
