//! Gradient checkpointing of the U-Net blocks (diffusers' `enable_gradient_checkpointing`): the U-Net's
//! forward runs without an autodiff graph, keeping only what enters each block; the backward then runs block
//! by block from the last, each block recomputed with its graph from its saved inputs and differentiated
//! alone. Peak activation memory is then the largest block's graph plus the block boundaries instead of
//! every block's graph at once, for about one more U-Net forward of compute.
//!
//! Burn 0.21 has no per-module checkpoint (only op-level `BalancedCheckpointing`), and a custom autodiff op
//! that recomputes a block in its backward would need a nested `backward()`, which deadlocks in
//! burn-autodiff 0.21.0 (fixed upstream after it, tracel-ai/burn#5194; docs/architecture.md). So this is
//! segment-wise backward: every block's backward is a top-level `backward()` of
//! `Σ output · (gradient of the output)`, and the gradients that cross blocks — the block input, the skip
//! tensors, the time embedding and the text states every cross-attention reads — are carried by hand.

use blipd_models::unet::{AttentionContext, UNet2DConditionModel};
use blipd_train::GradSet;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Gradients of trainable parameters, on the backend under autodiff (what a stage hands the trainer).
pub type InnerGrads<B> = GradSet<Inner<B>>;

/// What one block of the U-Net needs to be recomputed: its saved input (no graph) and the skip tensors it
/// makes (down blocks) or consumes (up blocks), as positions in [`Forward`]'s skip list.
struct Saved<B: Backend> {
    x: Tensor<B, 4>,
    skips: std::ops::Range<usize>,
    /// Up blocks: the upsampler's output size.
    upsample_size: Option<[usize; 2]>,
}

/// The U-Net's prediction for `(sample, timesteps, states)` computed without a graph, and what [`backward`]
/// recomputes the blocks from.
pub struct Forward<B: AutodiffBackend> {
    pub pred: Tensor<Inner<B>, 4>,
    /// `conv_in`'s input (the sample, centred when the config says so).
    conv_in: Tensor<Inner<B>, 4>,
    timesteps: Tensor<Inner<B>, 1>,
    /// The time embedding every resnet reads.
    emb: Tensor<Inner<B>, 2>,
    states: Tensor<Inner<B>, 3>,
    /// `conv_in`'s output, then each down block's skip tensors, in order.
    skips: Vec<Tensor<Inner<B>, 4>>,
    down: Vec<Saved<Inner<B>>>,
    mid: Option<Tensor<Inner<B>, 4>>,
    up: Vec<Saved<Inner<B>>>,
    out: Tensor<Inner<B>, 4>,
}

/// The gradients [`backward`] returns: the U-Net's parameters (paths relative to the `root` it was given,
/// as [`GradSet::from_backward`] makes them) and the text states.
pub struct UNetGrads<B: AutodiffBackend> {
    pub params: InnerGrads<B>,
    pub states: Option<Tensor<Inner<B>, 3>>,
}

/// The U-Net forward on the inner backend, saving each block's input: the computation of
/// [`UNet2DConditionModel::forward`] without ControlNet residuals or an attention hook.
pub fn forward<B: AutodiffBackend>(
    unet: &UNet2DConditionModel<B>,
    sample: Tensor<Inner<B>, 4>,
    timesteps: Tensor<Inner<B>, 1>,
    states: Tensor<Inner<B>, 3>,
) -> Forward<B> {
    let net = unet.valid();
    let [batch, _, _, _] = sample.dims();
    let emb = net.time_embed(timesteps.clone(), batch);
    let mut actx = AttentionContext::new(None, net.attention_kernel);
    let conv_in = if net.config.center_input_sample {
        sample * 2.0 - 1.0
    } else {
        sample
    };
    let mut x = blipd_models::amp::conv2d(&net.conv_in, conv_in.clone());
    let mut skips = vec![x.clone()];
    let mut down = Vec::with_capacity(net.down_blocks.len());
    for (i, block) in net.down_blocks.iter().enumerate() {
        let input = x.clone();
        let (out, res) = block.forward(x, emb.clone(), states.clone(), &mut actx, i);
        down.push(Saved {
            x: input,
            skips: skips.len()..skips.len() + res.len(),
            upsample_size: None,
        });
        x = out;
        skips.extend(res);
    }
    let mid = net.mid_block.as_ref().map(|m| {
        let input = x.clone();
        x = m.forward(x.clone(), emb.clone(), states.clone(), &mut actx);
        input
    });
    let n_up = net.up_blocks.len();
    let mut up = Vec::with_capacity(n_up);
    // Up blocks consume the skip tensors from the end.
    let mut left = skips.len();
    for (i, block) in net.up_blocks.iter().enumerate() {
        let first = left
            .checked_sub(block.resnets.len())
            .expect("skip tensors match up-block resnets");
        let upsample_size = (i + 1 < n_up && first > 0).then(|| {
            let [_, _, h, w] = skips[first - 1].dims();
            [h, w]
        });
        let input = x.clone();
        x = block.forward(
            x,
            skips[first..left].to_vec(),
            emb.clone(),
            states.clone(),
            upsample_size,
            &mut actx,
            i,
        );
        up.push(Saved {
            x: input,
            skips: first..left,
            upsample_size,
        });
        left = first;
    }
    Forward {
        pred: head(&net, x.clone()),
        conv_in,
        timesteps,
        emb,
        states,
        skips,
        down,
        mid,
        up,
        out: x,
    }
}

fn head<B: Backend>(net: &UNet2DConditionModel<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let x = blipd_models::nn::group_norm_silu(&net.conv_norm_out, x);
    blipd_models::amp::conv2d(&net.conv_out, x)
}

/// A leaf of one block's own graph.
fn leaf<B: AutodiffBackend, const D: usize>(t: &Tensor<Inner<B>, D>) -> Tensor<B, D> {
    Tensor::from_inner(t.clone()).require_grad()
}

/// `y · g` summed: the scalar whose gradient with respect to `y` is `g`.
fn dot<B: AutodiffBackend, const D: usize>(
    y: Tensor<B, D>,
    g: Tensor<Inner<B>, D>,
) -> Tensor<B, 1> {
    (y * Tensor::from_inner(g)).sum()
}

/// Adds `g` into `acc` (a missing gradient is zero).
fn add<B: Backend, const D: usize>(acc: &mut Option<Tensor<B, D>>, g: Option<Tensor<B, D>>) {
    if let Some(g) = g {
        *acc = Some(match acc.take() {
            Some(a) => a + g,
            None => g,
        });
    }
}

/// The gradients carried between the blocks during [`backward`].
struct Carry<'a, B: AutodiffBackend, M> {
    root: &'a M,
    params: InnerGrads<B>,
    emb: Option<Tensor<Inner<B>, 2>>,
    states: Option<Tensor<Inner<B>, 3>>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Carry<'_, B, M> {
    /// Differentiates one block's `loss`; collects the gradients of the parameters and of the shared
    /// leaves `emb`, `states`, and hands back the rest for the block's own leaves.
    fn backward(
        &mut self,
        loss: Tensor<B, 1>,
        emb: &Tensor<B, 2>,
        states: &Tensor<B, 3>,
    ) -> B::Gradients {
        let mut grads = loss.backward();
        add(&mut self.emb, emb.grad_remove(&mut grads));
        add(&mut self.states, states.grad_remove(&mut grads));
        grads
    }

    fn collect(&mut self, grads: B::Gradients) {
        self.params
            .accumulate(GradSet::from_backward::<B, M>(self.root, grads));
    }
}

/// The gradients of the U-Net's parameters and of the text states given `g_pred`, the gradient of the loss
/// with respect to [`Forward::pred`]: block by block from the output, each block recomputed from its saved
/// input with its own graph. `root` is the module the trainer collects gradients over (e.g. the stage's
/// model) and `unet` the U-Net inside it.
pub fn backward<B: AutodiffBackend, M: AutodiffModule<B>>(
    root: &M,
    unet: &UNet2DConditionModel<B>,
    fwd: Forward<B>,
    g_pred: Tensor<Inner<B>, 4>,
) -> UNetGrads<B> {
    let mut c = Carry::<B, M> {
        root,
        params: GradSet::from_entries(Vec::new()),
        emb: None,
        states: None,
    };
    let mut g_skips: Vec<Option<Tensor<Inner<B>, 4>>> = vec![None; fwd.skips.len()];
    let shared = || (leaf::<B, 2>(&fwd.emb), leaf::<B, 3>(&fwd.states));
    let ctx = || AttentionContext::new(None, unet.attention_kernel);
    let zeros = |t: &Tensor<Inner<B>, 4>| t.zeros_like();

    // conv_norm_out → conv_out.
    let x = leaf::<B, 4>(&fwd.out);
    let (e, s) = shared();
    let mut grads = c.backward(dot(head(unet, x.clone()), g_pred), &e, &s);
    let mut g = x.grad_remove(&mut grads).unwrap_or_else(|| zeros(&fwd.out));
    c.collect(grads);

    for (i, saved) in fwd.up.iter().enumerate().rev() {
        let x = leaf::<B, 4>(&saved.x);
        let res: Vec<Tensor<B, 4>> = fwd.skips[saved.skips.clone()].iter().map(leaf).collect();
        let (e, s) = shared();
        let y = unet.up_blocks[i].forward(
            x.clone(),
            res.clone(),
            e.clone(),
            s.clone(),
            saved.upsample_size,
            &mut ctx(),
            i,
        );
        let mut grads = c.backward(dot(y, g), &e, &s);
        for (pos, r) in saved.skips.clone().zip(&res) {
            add(&mut g_skips[pos], r.grad_remove(&mut grads));
        }
        g = x.grad_remove(&mut grads).unwrap_or_else(|| zeros(&saved.x));
        c.collect(grads);
    }

    if let (Some(mid), Some(input)) = (&unet.mid_block, &fwd.mid) {
        let x = leaf::<B, 4>(input);
        let (e, s) = shared();
        let y = mid.forward(x.clone(), e.clone(), s.clone(), &mut ctx());
        let mut grads = c.backward(dot(y, g), &e, &s);
        g = x.grad_remove(&mut grads).unwrap_or_else(|| zeros(input));
        c.collect(grads);
    }

    for (i, saved) in fwd.down.iter().enumerate().rev() {
        let x = leaf::<B, 4>(&saved.x);
        let (e, s) = shared();
        let (y, res) = unet.down_blocks[i].forward(x.clone(), e.clone(), s.clone(), &mut ctx(), i);
        let mut loss = dot(y, g);
        for (pos, r) in saved.skips.clone().zip(res) {
            if let Some(gs) = g_skips[pos].take() {
                loss = loss + dot(r, gs);
            }
        }
        let mut grads = c.backward(loss, &e, &s);
        g = x.grad_remove(&mut grads).unwrap_or_else(|| zeros(&saved.x));
        c.collect(grads);
    }

    // conv_in: its output is the first down block's input and the first skip tensor.
    let g0 = match g_skips[0].take() {
        Some(gs) => gs + g,
        None => g,
    };
    let y = blipd_models::amp::conv2d(&unet.conv_in, Tensor::from_inner(fwd.conv_in));
    c.collect(dot(y, g0).backward());

    // The time embedding, with every block's gradient for it.
    if let Some(g_emb) = c.emb.take() {
        let t = Tensor::<B, 1>::from_inner(fwd.timesteps);
        let batch = fwd.emb.dims()[0];
        c.collect(dot(unet.time_embed(t, batch), g_emb).backward());
    }
    UNetGrads {
        params: c.params,
        states: c.states,
    }
}

/// A loss on the U-Net's prediction for `(noisy, timesteps, states)`: with `checkpointing`, with its
/// gradients from [`loss_and_grads`]; without, on the ordinary graph (the trainer's `backward()` then
/// differentiates it). The one place fine-tuning and stage 2 choose between the two.
#[allow(clippy::too_many_arguments)]
pub fn denoising_loss<B: AutodiffBackend, M: AutodiffModule<B>>(
    root: &M,
    unet: &UNet2DConditionModel<B>,
    noisy: Tensor<B, 4>,
    timesteps: Tensor<B, 1>,
    states: Tensor<B, 3>,
    conditioning_trained: bool,
    checkpointing: bool,
    loss_fn: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 1>,
) -> (Tensor<B, 1>, Option<InnerGrads<B>>) {
    if checkpointing {
        let (loss, grads) = loss_and_grads(
            root,
            unet,
            noisy,
            timesteps,
            states,
            conditioning_trained,
            loss_fn,
        );
        (loss, Some(grads))
    } else {
        (loss_fn(unet.forward(noisy, timesteps, states, None)), None)
    }
}

/// A loss on the U-Net's prediction, differentiated with the U-Net checkpointed: the prediction for
/// `(noisy, timesteps, states)` without a graph, `loss_fn` on it as a leaf, the U-Net block by block
/// ([`backward`]), then the conditioning that made `states` from their gradient when `conditioning_trained`
/// (`states` then carries a graph back to trainable parameters of `root`). Returns the loss and the
/// gradients of every trainable parameter of `root`, as `loss.backward()` would give them.
pub fn loss_and_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    root: &M,
    unet: &UNet2DConditionModel<B>,
    noisy: Tensor<B, 4>,
    timesteps: Tensor<B, 1>,
    states: Tensor<B, 3>,
    conditioning_trained: bool,
    loss_fn: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 1>,
) -> (Tensor<B, 1>, InnerGrads<B>) {
    let fwd = forward(
        unet,
        noisy.inner(),
        timesteps.inner(),
        states.clone().inner(),
    );
    let pred = Tensor::<B, 4>::from_inner(fwd.pred.clone()).require_grad();
    let loss = loss_fn(pred.clone());
    let mut head = loss.backward();
    let g_pred = pred
        .grad_remove(&mut head)
        .expect("the loss depends on the prediction");
    let UNetGrads {
        mut params,
        states: g_states,
    } = backward(root, unet, fwd, g_pred);
    if let Some(g) = g_states.filter(|_| conditioning_trained) {
        let cond = (states * Tensor::from_inner(g)).sum().backward();
        params.accumulate(GradSet::from_backward::<B, M>(root, cond));
    }
    (loss, params)
}
