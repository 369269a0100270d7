//! `blipd_models::amp` on burn-flex (a CPU backend with bf16 kernels): inside an autocast scope a
//! linear layer, a convolution with asymmetric padding and a matmul compute in bf16 and return f32; the
//! gradients reach the f32 weights as f32; scopes nest and end with their guard.

use blipd_models::amp::{self, Autocast};
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::{DType, Distribution, FloatDType, Tensor};

type B = burn::backend::Autodiff<burn::backend::Flex>;

fn max_rel(a: &Tensor<B, 2>, b: &Tensor<B, 2>) -> f32 {
    let (a, b) = (
        a.to_data().to_vec::<f32>().unwrap(),
        b.to_data().to_vec::<f32>().unwrap(),
    );
    // Panics on NaN/Inf and on a length mismatch before the scale is taken.
    let worst = blipd_testkit::max_abs_diff(&a, &b) as f32;
    worst / a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

#[test]
fn linear_conv_and_matmul_compute_in_bf16_and_train_f32_weights() {
    let dev = Default::default();
    let lin = LinearConfig::new(64, 32).init::<B>(&dev);
    let x = Tensor::<B, 2>::random([8, 64], Distribution::Normal(0.0, 1.0), &dev);
    let full = amp::linear(&lin, x.clone());
    let (low, grad_w) = {
        let _scope = Autocast::enter(Some(FloatDType::BF16));
        assert_eq!(amp::autocast_dtype(), Some(FloatDType::BF16));
        {
            let _off = Autocast::enter(None);
            assert_eq!(amp::autocast_dtype(), None, "nested scope");
        }
        assert_eq!(amp::autocast_dtype(), Some(FloatDType::BF16), "restored");
        let y = amp::linear(&lin, x.clone());
        let g = y.clone().sum().backward();
        (
            y,
            lin.weight.grad(&g).expect("the f32 weight has a gradient"),
        )
    };
    assert_eq!(
        amp::autocast_dtype(),
        None,
        "the scope ended with its guard"
    );
    assert_eq!(low.dtype(), DType::F32);
    assert_eq!(grad_w.dtype(), DType::F32);
    let rel = max_rel(&full, &low);
    println!("linear: bf16 vs f32 max relative error {rel:.2e}");
    assert!(rel > 0.0 && rel < 2e-2, "{rel}");
    let g32 = lin.weight.grad(&full.sum().backward()).unwrap();
    let gr = (g32.clone() - grad_w).abs().max().into_scalar() / g32.abs().max().into_scalar();
    assert!(gr < 2e-2, "weight gradient relative error {gr}");

    // Asymmetric padding (diffusers' VAE downsampler) and a matmul.
    let conv = Conv2dConfig::new([3, 4], [3, 3])
        .with_stride([2, 2])
        .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
        .init::<B>(&dev);
    let img = Tensor::<B, 4>::random([2, 3, 9, 9], Distribution::Normal(0.0, 1.0), &dev);
    let c32 = amp::conv2d(&conv, img.clone());
    let c16 = {
        let _scope = Autocast::enter(Some(FloatDType::BF16));
        amp::conv2d(&conv, img)
    };
    assert_eq!(c32.dims(), c16.dims());
    assert_eq!(c16.dtype(), DType::F32);
    let rel = max_rel(&c32.flatten(0, 2), &c16.flatten(0, 2));
    println!("conv2d: bf16 vs f32 max relative error {rel:.2e}");
    assert!(rel > 0.0 && rel < 2e-2, "{rel}");
    let a = Tensor::<B, 2>::random([16, 64], Distribution::Normal(0.0, 1.0), &dev);
    let m32 = amp::matmul(a.clone(), x.clone().transpose());
    let m16 = {
        let _scope = Autocast::enter(Some(FloatDType::BF16));
        amp::matmul(a, x.transpose())
    };
    let rel = max_rel(&m32, &m16);
    assert!(rel > 0.0 && rel < 2e-2, "{rel}");
}
