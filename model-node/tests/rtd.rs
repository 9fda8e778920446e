//! RTD on the node: a reference store built by `model-node rtd build`'s code from examples, served
//! over real gRPC, retrieved by every RPC (proposals, scores, next characters); λ = 0 is the model
//! itself; a store for another model, or a broken file, is refused at start.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestNode, chat, greedy};
use ensemble_proto::v1 as pb;
use model_node::config::{DeferralArgs, RtdArgs};
use model_node::rtd::build;

/// Answers a tiny random model would never write.
const EXAMPLES: [(&str, &str); 3] = [
    ("what is the capital of zorbia?", "quillmoor fen"),
    ("who rules the cat?", "the mat sat."),
    ("name the river", "dog on a hat"),
];

fn write_examples(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("examples.jsonl");
    let lines: Vec<String> = EXAMPLES
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}], "answer": a}).to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n")?;
    Ok(path)
}

/// Builds the store of the model in `dir` over [`EXAMPLES`], as `model-node rtd build` does.
fn build_store(dir: &Path) -> anyhow::Result<PathBuf> {
    let loaded = model_node::node::load(&common::model_args(dir), &common::limits())?;
    let files = model_node::modeldir::ModelFiles::open(dir)?;
    let model = model_node::node::store_model(&files, &loaded.engine.codec().vocab);
    let examples = build::read_examples(&write_examples(dir)?)?;
    let store = build::build(&loaded.engine, model, &examples, &mut |_| {})?;
    assert!(store.len() >= EXAMPLES.iter().map(|(_, a)| a.len() / 4).sum::<usize>());
    let path = dir.join("store.rtd");
    store.save(&path)?;
    Ok(path)
}

fn rtd(store: &Path, lambda: f64) -> RtdArgs {
    RtdArgs {
        rtd_store: Some(store.to_path_buf()),
        rtd_lambda: lambda,
        rtd_k: 4,
        rtd_temperature: 0.01,
        rtd_max_distance: f64::INFINITY,
    }
}

async fn node(dir: &Path, rtd: &RtdArgs) -> anyhow::Result<TestNode> {
    let loaded = model_node::node::load_serving(
        &common::model_args(dir),
        &common::limits(),
        &DeferralArgs::default(),
        rtd,
    )?;
    let opts = model_node::server::ServeOptions {
        grace: Duration::from_secs(10),
        ..Default::default()
    };
    TestNode::start_loaded(loaded, opts).await
}

fn score(q: &str, candidate: &str) -> pb::ScoreRequest {
    pb::ScoreRequest {
        context: chat(q, "", ""),
        candidates: vec![candidate.into()],
        string_prefix: false,
        ends_answer: vec![true],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_answer_is_retrieved_by_every_rpc() -> anyhow::Result<()> {
    let dir = common::model_dir(&common::temp_dir("rtd-retrieve"), "llama", "byte_level", 41)?;
    let store = build_store(&dir)?;
    let mut with = node(&dir, &rtd(&store, 0.9)).await?;
    let mut plain = node(&dir, &RtdArgs::default()).await?;
    let (mut c, mut p) = (with.client().await?, plain.client().await?);
    let info = c
        .info(pb::InfoRequest {})
        .await?
        .into_inner()
        .rtd_store
        .unwrap_or_default();
    assert!(
        info.entries > 0 && (info.lambda - 0.9).abs() < 1e-12 && info.k == 4,
        "{info:?}"
    );
    assert_eq!(info.examples, EXAMPLES.len() as u64);
    assert!(p.info(pb::InfoRequest {}).await?.into_inner().rtd_store.is_none());
    for (q, a) in EXAMPLES {
        // Greedy proposals write the stored answer, and its stored end.
        let r = c.propose_segment(greedy(chat(q, "", ""), 32)).await?.into_inner();
        assert_eq!(
            (r.text.as_str(), r.finish_reason()),
            (a, pb::FinishReason::Eos),
            "{q}"
        );
        let free = p.propose_segment(greedy(chat(q, "", ""), 32)).await?.into_inner();
        assert_ne!(free.text, a, "{q}: the model alone should not know it");
        // Scores: the answer is far likelier with the store.
        let s = c.score_candidates(score(q, a)).await?.into_inner().scores[0].sum_logprob;
        let s0 = p.score_candidates(score(q, a)).await?.into_inner().scores[0].sum_logprob;
        assert!(s > s0 + 10.0, "{q}: {s} vs {s0}");
        // Next characters (look-ahead forwards included): the answer's first character leads.
        let n = c
            .next_char_distribution(pb::NextCharRequest {
                context: chat(q, "", ""),
                top_k: 4,
                max_hypotheses: None,
                lookahead: None,
            })
            .await?
            .into_inner();
        let top = n.chars.first().map(|ch| ch.char.clone()).unwrap_or_default();
        assert_eq!(top, a[..1], "{q}: {n:?}");
    }
    with.stop().await?;
    plain.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_zero_is_the_model_itself_bit_for_bit() -> anyhow::Result<()> {
    let dir = common::model_dir(&common::temp_dir("rtd-zero"), "qwen2", "sentencepiece", 42)?;
    let store = build_store(&dir)?;
    let mut off = node(&dir, &rtd(&store, 0.0)).await?;
    let mut plain = node(&dir, &RtdArgs::default()).await?;
    let (mut c, mut p) = (off.client().await?, plain.client().await?);
    assert!(c.info(pb::InfoRequest {}).await?.into_inner().rtd_store.is_none());
    for (q, a) in EXAMPLES {
        let r = c.propose_segment(greedy(chat(q, "", ""), 16)).await?.into_inner();
        let r0 = p.propose_segment(greedy(chat(q, "", ""), 16)).await?.into_inner();
        assert_eq!((r.text, r.token_logprobs), (r0.text, r0.token_logprobs));
        let s = c.score_candidates(score(q, a)).await?.into_inner().scores;
        let s0 = p.score_candidates(score(q, a)).await?.into_inner().scores;
        assert_eq!(s, s0);
    }
    off.stop().await?;
    plain.stop().await?;
    Ok(())
}

/// `ctx` with this call's λ.
fn with_lambda(ctx: Option<pb::Context>, lambda: Option<f64>) -> Option<pb::Context> {
    ctx.map(|c| pb::Context {
        rtd_lambda: lambda,
        ..c
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sets_its_own_lambda_even_inside_a_batched_step() -> anyhow::Result<()> {
    let dir = common::model_dir(&common::temp_dir("rtd-request"), "llama", "byte_level", 45)?;
    let store = build_store(&dir)?;
    let mut with = node(&dir, &rtd(&store, 0.9)).await?;
    let mut plain = node(&dir, &RtdArgs::default()).await?;
    let (c, mut p) = (with.client().await?, plain.client().await?);
    for (q, a) in EXAMPLES {
        let off = |n| greedy(with_lambda(chat(q, "", ""), Some(0.0)), n);
        let on = |n| greedy(with_lambda(chat(q, "", ""), None), n);
        let alone = p.propose_segment(greedy(chat(q, "", ""), 16)).await?.into_inner();
        // Both at once, so the engine decodes them in the same batched steps: each row its own λ.
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (r_off, r_on) = tokio::join!(c1.propose_segment(off(16)), c2.propose_segment(on(32)));
        let (r_off, r_on) = (r_off?.into_inner(), r_on?.into_inner());
        // (A batch of two rows sums in another order than one row: equal to f32 rounding.)
        assert_eq!(r_off.text, alone.text, "{q}");
        assert_eq!(r_off.token_logprobs.len(), alone.token_logprobs.len());
        for (x, y) in r_off.token_logprobs.iter().zip(&alone.token_logprobs) {
            assert!((x - y).abs() < 1e-5, "{q}: {x} vs {y}");
        }
        assert_eq!(r_on.text, a, "{q}");
        // Scores and next characters with λ 0: the model alone, bit for bit.
        let mut s = score(q, a);
        s.context = with_lambda(s.context, Some(0.0));
        let s_off = c.clone().score_candidates(s).await?.into_inner().scores;
        assert_eq!(s_off, p.score_candidates(score(q, a)).await?.into_inner().scores);
        let nc = |ctx| pb::NextCharRequest {
            context: ctx,
            top_k: 8,
            max_hypotheses: None,
            lookahead: None,
        };
        let n_off = c
            .clone()
            .next_char_distribution(nc(with_lambda(chat(q, "", ""), Some(0.0))))
            .await?
            .into_inner();
        let n0 = p.next_char_distribution(nc(chat(q, "", ""))).await?.into_inner();
        assert_eq!((n_off.chars, n_off.eos_prob), (n0.chars, n0.eos_prob), "{q}");
    }
    let bad = c
        .clone()
        .propose_segment(greedy(with_lambda(chat("x", "", ""), Some(1.5)), 4))
        .await
        .expect_err("λ 1.5");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("rtd_lambda"), "{}", bad.message());
    with.stop().await?;
    plain.stop().await?;
    Ok(())
}

#[test]
fn a_store_for_another_model_or_a_broken_file_is_refused_at_start() -> anyhow::Result<()> {
    let root = common::temp_dir("rtd-refuse");
    let a = common::model_dir(&root, "llama", "byte_level", 43)?;
    let b = common::model_dir(&root, "phi3", "char", 44)?;
    let store = build_store(&a)?;
    let load = |dir: &Path, file: &Path| {
        model_node::node::load_serving(
            &common::model_args(dir),
            &common::limits(),
            &DeferralArgs::default(),
            &rtd(file, 0.5),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert_eq!(load(&a, &store), Ok(()));
    let e = load(&b, &store).expect_err("another model");
    assert!(
        e.contains("built for another model") && e.contains("store.rtd"),
        "{e}"
    );
    let bytes = std::fs::read(&store)?;
    for (name, broken) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("garbage", b"not a store at all".to_vec()),
    ] {
        let path = root.join(format!("{name}.rtd"));
        std::fs::write(&path, broken)?;
        let e = load(&a, &path).expect_err(name);
        assert!(
            e.starts_with("RTD store ") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }
    let e = load(&a, &root.join("missing.rtd")).expect_err("missing");
    assert!(e.contains("missing.rtd"), "{e}");
    Ok(())
}
