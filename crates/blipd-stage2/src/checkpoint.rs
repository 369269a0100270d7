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

/// What one block of the U-Net needs to be recomputed: its saved input (no graph).
struct Saved<B: Backend> {
    x: Tensor<B, 4>,
    /// Down blocks: the positions in the skip list of the skip tensors they make. Up blocks: those they
    /// consume, with the tensors.
    skips: Vec<(usize, Option<Tensor<B, 4>>)>,
    /// Up blocks: the upsampler's output size.
    upsample_size: Option<[usize; 2]>,
}

/// The U-Net's prediction for `(sample, timesteps, states)` computed without a graph, and the block inputs
/// [`backward`] recomputes from.
pub struct Forward<B: AutodiffBackend> {
    pub pred: Tensor<Inner<B>, 4>,
    sample: Tensor<Inner<B>, 4>,
    timesteps: Tensor<Inner<B>, 1>,
    states: Tensor<Inner<B>, 3>,
    down: Vec<Saved<Inner<B>>>,
    mid: Option<Tensor<Inner<B>, 4>>,
    up: Vec<Saved<Inner<B>>>,
    out: Tensor<Inner<B>, 4>,
    n_skips: usize,
}

/// The gradients [`backward`] returns: the U-Net's parameters (paths relative to the `root` it was given,
/// as [`GradSet::from_backward`] makes them) and the text states.
pub struct UNetGrads<B: AutodiffBackend> {
    pub params: GradSet<Inner<B>>,
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
    let mut x = blipd_models::amp::conv2d(&net.conv_in, centre(&net, sample.clone()));
    let mut skips = vec![x.clone()];
    let mut down = Vec::with_capacity(net.down_blocks.len());
    for (i, block) in net.down_blocks.iter().enumerate() {
        let input = x.clone();
        let (out, res) = block.forward(x, emb.clone(), states.clone(), &mut actx, i);
        down.push(Saved {
            x: input,
            skips: (skips.len()..skips.len() + res.len())
                .map(|p| (p, None))
                .collect(),
            upsample_size: None,
        });
        x = out;
        skips.extend(res);
    }
    let n_skips = skips.len();
    let mid = net.mid_block.as_ref().map(|m| {
        let input = x.clone();
        x = m.forward(x.clone(), emb.clone(), states.clone(), &mut actx);
        input
    });
    let n_up = net.up_blocks.len();
    let mut up = Vec::with_capacity(n_up);
    let mut indexed: Vec<(usize, Tensor<Inner<B>, 4>)> = skips.into_iter().enumerate().collect();
    for (i, block) in net.up_blocks.iter().enumerate() {
        let rest = indexed
            .len()
            .checked_sub(block.resnets.len())
            .expect("skip tensors match up-block resnets");
        let res = indexed.split_off(rest);
        let upsample_size = if i + 1 < n_up {
            indexed.last().map(|(_, s)| [s.dims()[2], s.dims()[3]])
        } else {
            None
        };
        let input = x.clone();
        let tensors = res.iter().map(|(_, s)| s.clone()).collect();
        x = block.forward(
            x,
            tensors,
            emb.clone(),
            states.clone(),
            upsample_size,
            &mut actx,
            i,
        );
        up.push(Saved {
            x: input,
            skips: res.into_iter().map(|(p, s)| (p, Some(s))).collect(),
            upsample_size,
        });
    }
    Forward {
        pred: head(&net, x.clone()),
        sample,
        timesteps,
        states,
        down,
        mid,
        up,
        out: x,
        n_skips,
    }
}

fn centre<B: Backend>(net: &UNet2DConditionModel<B>, sample: Tensor<B, 4>) -> Tensor<B, 4> {
    if net.config.center_input_sample {
        sample * 2.0 - 1.0
    } else {
        sample
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
    params: GradSet<Inner<B>>,
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
    let [batch, _, _, _] = fwd.sample.dims();
    let emb_value = unet.valid().time_embed(fwd.timesteps.clone(), batch);
    let mut c = Carry::<B, M> {
        root,
        params: GradSet::from_entries(Vec::new()),
        emb: None,
        states: None,
    };
    let mut g_skips: Vec<Option<Tensor<Inner<B>, 4>>> = vec![None; fwd.n_skips];
    let shared = || (leaf::<B, 2>(&emb_value), leaf::<B, 3>(&fwd.states));
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
        let res: Vec<Tensor<B, 4>> = saved
            .skips
            .iter()
            .map(|(_, t)| leaf(t.as_ref().expect("up blocks keep their skips")))
            .collect();
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
        for ((pos, _), r) in saved.skips.iter().zip(&res) {
            add(&mut g_skips[*pos], r.grad_remove(&mut grads));
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
        for ((pos, _), r) in saved.skips.iter().zip(res) {
            if let Some(gs) = g_skips[*pos].take() {
                loss = loss + dot(r, gs);
            }
        }
        let mut grads = c.backward(loss, &e, &s);
        g = x.grad_remove(&mut grads).unwrap_or_else(|| zeros(&saved.x));
        c.collect(grads);
    }

    // conv_in: its output is the first down block's input and the first skip tensor.
    add(&mut g_skips[0], Some(g));
    let sample = Tensor::<B, 4>::from_inner(centre(&unet.valid(), fwd.sample.clone()));
    let y = blipd_models::amp::conv2d(&unet.conv_in, sample);
    let g0 = g_skips[0].take().expect("set above");
    let (e, s) = shared();
    let grads = c.backward(dot(y, g0), &e, &s);
    c.collect(grads);

    // The time embedding, with every block's gradient for it.
    if let Some(g_emb) = c.emb.take() {
        let t = Tensor::<B, 1>::from_inner(fwd.timesteps.clone());
        let grads = dot(unet.time_embed(t, batch), g_emb).backward();
        c.collect(grads);
    }
    UNetGrads {
        params: c.params,
        states: c.states,
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
) -> (Tensor<B, 1>, GradSet<Inner<B>>) {
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
