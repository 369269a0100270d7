//! Training and generation condition identically: a stage-2 training step and the pipeline it exports
//! turn the same subject image, subject and caption into the same subject embeddings and the same
//! U-Net text states — for the released and the paper prompt template, with the subject text and
//! without it (the paper's ablation), for kept and dropped samples, with and without guidance. A
//! fault between the parts (embeddings spliced at one place in training and another at generation,
//! a template the export forgets, the Q-Former reading text it was not trained with) fails here.

use blipd_apps::generate::{BlipDiffusionPipeline, GenerateOptions};
use blipd_models::conditioning;
use blipd_models::tokenizers::TextNormalization;
use blipd_stage2::export_pipeline;
use blipd_stage2::run::{build, Stage2RunConfig};
use blipd_testkit::{assert_close, Cpu, CpuTrain};
use burn::module::AutodiffModule;
use burn::tensor::{Distribution, Tensor};

fn config(dir: &std::path::Path, extra: &[String]) -> Stage2RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 5\n[train]\nmax_steps = 1\nbatch_size = 2\nprogress = false\n\
         [optimizer]\nlr = 0.001\n[checkpoint]\nevery = 0\n[sample]\nat_end = false\n\
         [stage]\npreset = \"tiny\"\n[data]\ntarget_size = 32\n[data.synthetic]\npairs = 4\nseed = 1\n",
        dir.display().to_string()
    );
    blipd_train::parse_config(&text, extra).unwrap()
}

/// Build a tiny stage 2 with `extra` settings, export it, load the export as a pipeline, and compare
/// every conditioning path on one batch (row 0 kept, row 1 dropped).
fn check(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let cfg = config(&tmp.path().join("run"), &extra);
    let device = blipd_testkit::device();
    let (stage, model, _) = build::<CpuTrain>(&cfg, &device).unwrap();
    let export = tmp.path().join("export");
    export_pipeline(&stage, &model, &export).unwrap();
    let pipe = BlipDiffusionPipeline::<Cpu>::load(&export, None, &device).unwrap();
    let model = model.valid();
    let what = format!("{extra:?}");

    let s = stage.image_size;
    let pixels = Tensor::<Cpu, 4>::random([2, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
    let subjects = ["dog".to_string(), "red backpack".to_string()];
    let captions = [
        "on the grass at night".to_string(),
        "in the snow".to_string(),
    ];
    let subject_refs = ["dog", "red backpack"];

    // Subject embeddings: the training step's and the pipeline's.
    let ctx_train = stage
        .subject_embeddings(&model.qformer, pixels.clone(), &subjects)
        .unwrap();
    let ctx_pipe = pipe
        .subject_embeddings(pixels, &subject_refs, TextNormalization::None)
        .unwrap();
    assert_close(
        &format!("{what} subject embeddings"),
        ctx_train.clone(),
        ctx_pipe.clone(),
        0.0,
    );

    // Text states of a training batch with row 1's subject dropped.
    let train = stage
        .prompt_states(
            &model.text_encoder,
            ctx_train.clone(),
            &captions,
            &subjects,
            &[true, false],
        )
        .unwrap();
    let plain = GenerateOptions {
        guidance_scale: 1.0,
        ..GenerateOptions::default()
    };
    let kept = pipe
        .encode_prompt(
            ctx_pipe.clone().narrow(0, 0, 1),
            &[captions[0].as_str()],
            &[subject_refs[0]],
            &plain,
        )
        .unwrap();
    assert_close(
        &format!("{what} kept sample"),
        train.clone().narrow(0, 0, 1),
        kept,
        0.0,
    );
    let dropped = pipe
        .text_only_embeddings(&[captions[1].as_str()], &plain)
        .unwrap();
    assert_close(
        &format!("{what} dropped sample"),
        train.narrow(0, 1, 1),
        dropped,
        0.0,
    );

    // Guided: the sample sheets' states (`[uncond; cond]`) and generation's.
    let sheet = conditioning::guided_states(
        &model.text_encoder,
        &stage.clip_tokenizer,
        &stage.prompt,
        ctx_train,
        &[captions[0].as_str(), captions[1].as_str()],
        &subject_refs,
        Some(""),
    )
    .unwrap();
    let guided = pipe
        .text_embeddings(
            ctx_pipe,
            &[captions[0].as_str(), captions[1].as_str()],
            &subject_refs,
            &GenerateOptions::default(),
        )
        .unwrap();
    assert_eq!(guided.dims()[0], 4);
    assert_close(&format!("{what} guided"), sheet, guided, 0.0);
    assert_eq!(pipe.prompt, stage.prompt, "{what}: the pipeline's prompt");

    // Fine-tuning the export starts from the subject embedding the training step would compute for
    // its photo (with or without the subject text, as the export says).
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let photo = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
    });
    photo.save(photos.join("00.png")).unwrap();
    let ft_cfg: blipd_stage2::finetune::FinetuneRunConfig = blipd_train::parse_config(
        &format!(
            "[run]\ndir = {:?}\nseed = 3\n[train]\nmax_steps = 1\nbatch_size = 1\nprogress = false\n\
             [optimizer]\nlr = 0.001\n[checkpoint]\nevery = 0\n[sample]\nat_end = false\n\
             [stage]\nmodel_dir = {:?}\nsubject = \"dog\"\n[data]\nimages = {:?}\ntarget_size = 32\n",
            tmp.path().join("ft").display().to_string(),
            export.display().to_string(),
            photos.display().to_string()
        ),
        &[],
    )
    .unwrap();
    let (_, ft_model, _) = blipd_stage2::finetune::build::<CpuTrain>(&ft_cfg, &device).unwrap();
    let px = blipd_data::preprocess::clip_input(&photo, s);
    let px = Tensor::<Cpu, 4>::from_data(burn::tensor::TensorData::new(px, [1, 3, s, s]), &device);
    let want = stage
        .subject_embeddings(&model.qformer, px, &["dog".to_string()])
        .unwrap();
    assert_close(
        &format!("{what} fine-tuning's initial subject embedding"),
        ft_model.ctx.val().inner(),
        want,
        0.0,
    );
}

#[test]
fn released_template() {
    check(&[]);
}

#[test]
fn paper_template() {
    check(&["stage.template=\"paper\""]);
}

#[test]
fn without_subject_text() {
    check(&["stage.use_subject_text=false", "stage.prompt_reps=3"]);
}
