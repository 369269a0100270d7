//! Context CLIP text encoder vs diffusers `ContextCLIPTextModel` / transformers `CLIPTextModel`
//! (fixture: scripts/reference/gen_ctx_clip_text.py).

use blipd_models::ctx_clip_text::{ClipTextConfig, ContextClipTextModel};
use blipd_models::weights::StateDict;
use blipd_models::ModelError;
use burn::prelude::*;

use crate::common::{assert_close, device, fixture_dir, int_tensor, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn load() -> (ClipTextConfig, ContextClipTextModel<B>) {
    let cfg = ClipTextConfig::from_file(&fixture_dir("ctx_clip_text").join("config.json")).unwrap();
    assert_eq!(
        cfg,
        ClipTextConfig::tiny(),
        "fixture config differs from ClipTextConfig::tiny()"
    );
    let model = cfg
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(weights("ctx_clip_text"))
        .unwrap();
    (cfg, model)
}

#[test]
fn ctx_clip_text_with_context_matches_diffusers() {
    let (_, model) = load();
    let io = io("ctx_clip_text");
    let ids = int_tensor::<2>(&io, "input_ids");
    let ctx = tensor::<3>(&io, "ctx_embeddings");
    let out = model.forward(ids.clone(), Some(ctx.clone()), 2).unwrap();
    assert_eq!(out.dims(), [2, 24, 32]);
    assert_close("ctx_clip_text ctx@2", out, tensor(&io, "out_ctx"), TOL);
    let out0 = model.forward(ids, Some(ctx), 0).unwrap();
    assert_close(
        "ctx_clip_text ctx@0",
        out0,
        tensor(&io, "out_ctx_pos0"),
        TOL,
    );
}

#[test]
fn ctx_clip_text_without_context_is_plain_clip() {
    let (cfg, model) = load();
    let io = io("ctx_clip_text");
    let ids = int_tensor::<2>(&io, "input_ids");
    let out = model.forward(ids.clone(), None, 2).unwrap();
    assert_close(
        "ctx_clip_text no ctx",
        out.clone(),
        tensor(&io, "out_noctx"),
        TOL,
    );
    assert_close(
        "CLIPTextModel last_hidden_state",
        out.clone(),
        tensor(&io, "clip_last_hidden_state"),
        TOL,
    );
    let pooled = ContextClipTextModel::pooled_output(out, ids, cfg.eos_token_id);
    assert_close(
        "CLIPTextModel pooler_output",
        pooled,
        tensor(&io, "clip_pooler_output"),
        TOL,
    );

    let long = int_tensor::<2>(&io, "long_input_ids");
    let out = model.forward(long, None, 0).unwrap();
    assert_close(
        "CLIPTextModel full-length last_hidden_state",
        out,
        tensor(&io, "clip_long_last_hidden_state"),
        TOL,
    );
}

#[test]
fn ctx_clip_text_rejects_too_many_positions() {
    let (_, model) = load();
    let dev = device();
    // 9 tokens + 16 context = 25 > max_position_embeddings 24.
    let ids = Tensor::<B, 2, Int>::zeros([1, 9], &dev);
    let ctx = Tensor::<B, 3>::zeros([1, 16, 32], &dev);
    match model.forward(ids, Some(ctx), 2) {
        Err(ModelError::Invalid(msg)) => {
            assert!(msg.contains("max_position_embeddings 24"), "{msg}");
        }
        other => panic!(
            "expected a position-budget error, got {:?}",
            other.map(|t| t.dims())
        ),
    }
    // Plain CLIP past the budget, a wrong context width and a splice point past the prompt.
    assert!(model
        .forward(Tensor::<B, 2, Int>::zeros([1, 25], &dev), None, 0)
        .is_err());
    let ids = Tensor::<B, 2, Int>::zeros([1, 4], &dev);
    assert!(model
        .forward(
            ids.clone(),
            Some(Tensor::<B, 3>::zeros([1, 16, 31], &dev)),
            2
        )
        .is_err());
    assert!(model
        .forward(
            ids.clone(),
            Some(Tensor::<B, 3>::zeros([2, 16, 32], &dev)),
            2
        )
        .is_err());
    assert!(model
        .forward(ids, Some(Tensor::<B, 3>::zeros([1, 16, 32], &dev)), 5)
        .is_err());
}

#[test]
fn ctx_clip_text_weights_strict_and_round_trip() {
    let (cfg, model) = load();
    // Missing key → strict error naming it.
    let mut sd = weights("ctx_clip_text");
    sd.drop_keys(|k| k == "text_model.final_layer_norm.bias");
    let err = cfg
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(sd)
        .unwrap_err()
        .to_string();
    assert!(err.contains("final_layer_norm"), "{err}");

    // Save in the reference layout, reload, same outputs; keys equal the reference keys.
    let dir = std::env::temp_dir().join(format!("blipd-ctx-clip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("text_encoder.safetensors");
    model.save(&path).unwrap();
    let saved = StateDict::read(&path).unwrap();
    let mut reference: Vec<String> = weights("ctx_clip_text")
        .keys()
        .filter(|k| !k.ends_with("position_ids"))
        .cloned()
        .collect();
    reference.sort();
    let ours: Vec<String> = saved.keys().cloned().collect();
    assert_eq!(ours, reference);
    let ref_sd = weights("ctx_clip_text");
    for k in [
        "text_model.encoder.layers.1.mlp.fc1.weight",
        "text_model.final_layer_norm.weight",
    ] {
        let a = saved
            .data(k)
            .unwrap()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        let b = ref_sd
            .data(k)
            .unwrap()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(a, b, "{k} round trip");
    }
    let reloaded = cfg
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(saved)
        .unwrap();
    let io = io("ctx_clip_text");
    let out = reloaded
        .forward(
            int_tensor::<2>(&io, "input_ids"),
            Some(tensor::<3>(&io, "ctx_embeddings")),
            2,
        )
        .unwrap();
    assert_close("ctx_clip_text reloaded", out, tensor(&io, "out_ctx"), TOL);
    std::fs::remove_dir_all(&dir).ok();
}

/// The pipeline helper: [uncond; cond] with the cond half equal to a manual splice.
#[test]
fn ctx_clip_text_blip_diffusion_conditioning() {
    use blipd_models::conditioning::{condition, guided_states};
    use blipd_models::tokenizers::{BlipDiffusionPrompt, ClipTokenizer};

    let tok = ClipTokenizer::from_dir(&fixture_dir("tokenizers").join("tiny_clip")).unwrap();
    let cfg = ClipTextConfig {
        vocab_size: tok.vocab_size(),
        max_position_embeddings: 24,
        ..ClipTextConfig::tiny()
    };
    let model = cfg.init::<B>(&device()).unwrap();
    let prompt = BlipDiffusionPrompt {
        prompt_reps: 3,
        max_position_embeddings: 24,
        ..Default::default()
    };
    let ctx = Tensor::<B, 3>::random(
        [2, 16, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device(),
    );
    let prompts = ["swimming", "in the snow"];
    let subjects = ["dog", "cat"];
    let out = guided_states(
        &model,
        &tok,
        &prompt,
        ctx.clone(),
        &prompts,
        &subjects,
        Some(""),
    )
    .unwrap();
    assert_eq!(out.dims(), [4, 24, 32]);
    let ids = prompt.cond_tokens(&tok, &prompts, &subjects).unwrap();
    assert_eq!(ids.seq_len(), 8);
    let cond = model
        .forward(ids.ids_tensor::<B>(&device()), Some(ctx.clone()), 2)
        .unwrap();
    assert_close(
        "conditioning cond half",
        out.clone().narrow(0, 2, 2),
        cond,
        0.0,
    );
    let unc = prompt.uncond_tokens(&tok, "", 2).unwrap();
    let unc = model
        .forward(unc.ids_tensor::<B>(&device()), None, 0)
        .unwrap();
    assert_close("conditioning uncond half", out.narrow(0, 0, 2), unc, 0.0);
    // Without a negative prompt: cond only; a context/prompt count mismatch is an error.
    let only = guided_states(
        &model,
        &tok,
        &prompt,
        ctx.clone(),
        &prompts,
        &subjects,
        None,
    )
    .unwrap();
    assert_eq!(only.dims(), [2, 24, 32]);
    // Subject dropping: row 0 conditional, row 1 its prompt alone (24 ids, no context).
    let mixed = condition(
        &model,
        &tok,
        &prompt,
        ctx.clone(),
        &prompts,
        &subjects,
        &[true, false],
    )
    .unwrap();
    assert_close(
        "kept row",
        mixed.clone().narrow(0, 0, 1),
        only.clone().narrow(0, 0, 1),
        0.0,
    );
    let text = tok.encode_batch(&["in the snow"], 24).unwrap();
    let text = model
        .forward(text.ids_tensor::<B>(&device()), None, 0)
        .unwrap();
    assert_close("dropped row", mixed.narrow(0, 1, 1), text, 0.0);
    assert!(guided_states(
        &model,
        &tok,
        &prompt,
        ctx,
        &prompts[..1],
        &subjects[..1],
        None
    )
    .is_err());
}

#[test]
fn ctx_clip_text_sd15_preset() {
    let c = ClipTextConfig::sd15();
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads
        ),
        (49408, 768, 3072, 12, 12)
    );
    assert_eq!(c.max_position_embeddings, 77);
    assert_eq!(c.head_dim(), 64);
    c.validate().unwrap();
    let mut bad = c.clone();
    bad.hidden_act = "relu".into();
    assert!(bad.validate().is_err());
}
