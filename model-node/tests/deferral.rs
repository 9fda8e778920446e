//! Co-LLM on the node: deferral heads loaded with `--deferral-head`, ProposeSegment with
//! `defer_threshold` over real gRPC, and the deferral logits checked against an independent
//! computation from the model's hidden states.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::{IndexOp, Tensor};
use common::{TestNode, greedy, raw};
use ensemble_proto::v1 as pb;
use model_node::config::DeferralArgs;
use model_node::deferral::DeferralHead;
use model_node::model::KvCache;
use tonic::Code;

/// Char-level models: a Llama, a Gemma 2 (soft-capping) and a Mistral whose sliding window (4
/// positions) is shorter than the contexts used, built once per test binary.
fn dirs() -> &'static [PathBuf; 3] {
    static DIRS: OnceLock<[PathBuf; 3]> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = common::temp_dir("deferral");
        let mk = |arch, seed| common::model_dir(&root, arch, "char", seed).expect("model dir");
        let windowed = mk("mistral", 13);
        let cfg_path = windowed.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
        cfg["sliding_window"] = serde_json::json!(4);
        std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
        [mk("llama", 11), mk("gemma2", 12), windowed]
    })
}

const HIDDEN: usize = 32;

/// Two heads with the given vectors and biases, written to `dir/name`.
fn head_file(dir: &Path, name: &str, heads: Vec<Vec<f32>>, bias: Vec<f32>) -> anyhow::Result<PathBuf> {
    let h = DeferralHead {
        assistants: (0..heads.len()).map(|i| format!("asst{i}")).collect(),
        heads,
        bias,
        eta: 0.6,
        base: "test".into(),
    };
    let path = dir.join(name);
    h.save(&path)?;
    Ok(path)
}

/// A small, varied head vector (|h·g| stays far below the thresholds used).
fn pattern(k: usize) -> Vec<f32> {
    (0..HIDDEN)
        .map(|i| 0.02 * ((i * 7 + k * 3) as f32).sin())
        .collect()
}

fn loaded(dir: &Path, head: Option<&Path>) -> anyhow::Result<model_node::node::Loaded> {
    let args = DeferralArgs {
        deferral_head: head.map(Path::to_path_buf),
    };
    Ok(model_node::node::load_with(
        &common::model_args(dir),
        &common::limits(),
        &args,
    )?)
}

async fn node(dir: &Path, head: Option<&Path>) -> anyhow::Result<TestNode> {
    let opts = model_node::server::ServeOptions {
        grace: Duration::from_secs(10),
        ..Default::default()
    };
    TestNode::start_loaded(loaded(dir, head)?, opts).await
}

fn deferring(ctx: Option<pb::Context>, n: u32, eta: f64) -> pb::ProposeRequest {
    pb::ProposeRequest {
        defer_threshold: Some(eta),
        ..greedy(ctx, n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sure_head_defers_at_once_and_info_reports_it() -> anyhow::Result<()> {
    let dir = &dirs()[0];
    let file = head_file(
        dir,
        "sure.safetensors",
        vec![vec![0.0; HIDDEN]; 2],
        vec![50.0, 0.0],
    )?;
    let mut n = node(dir, Some(&file)).await?;
    let mut c = n.client().await?;
    let info = c.info(pb::InfoRequest {}).await?.into_inner();
    let d = info.deferral_head.unwrap_or_default();
    assert_eq!(d.assistants, vec!["asst0", "asst1"]);
    assert!((d.eta - 0.6).abs() < 1e-12);
    assert!(d.path.ends_with("sure.safetensors"), "{}", d.path);

    // An empty context has nothing to heal: the very first position defers, with empty text.
    let r = c
        .propose_segment(deferring(raw("", "", ""), 8, 0.6))
        .await?
        .into_inner();
    assert_eq!(r.finish_reason(), pb::FinishReason::Defer);
    assert_eq!(r.text, "");
    assert!(r.token_logprobs.is_empty());
    assert_eq!(r.defer_probs.len(), 1);
    assert!(r.defer_probs[0] > 0.999);
    assert_eq!(r.defer_head_probs.len(), 2);
    assert!(r.defer_head_probs[0] > 0.999 && (r.defer_head_probs[1] - 0.5).abs() < 1e-6);

    // A context ending in text: the first token heals it (never deferred, reported as 0), and the
    // next position defers.
    let r = c
        .propose_segment(deferring(raw("once upon a ti", "", "s"), 8, 0.6))
        .await?
        .into_inner();
    assert_eq!(r.finish_reason(), pb::FinishReason::Defer);
    assert_eq!(r.token_logprobs.len(), 1, "{r:?}");
    assert_eq!(r.defer_probs.len(), 2);
    assert_eq!(r.defer_probs[0], 0.0);
    assert!(r.defer_probs[1] > 0.999);

    // Without a threshold nothing changes.
    let r = c.propose_segment(greedy(raw("", "", ""), 4)).await?.into_inner();
    assert_ne!(r.finish_reason(), pb::FinishReason::Defer);
    assert!(r.defer_probs.is_empty() && r.defer_head_probs.is_empty());
    n.stop().await?;
    Ok(())
}

/// After an assistant's handoff the context usually ends inside one of the base's tokens; the
/// healing token then re-spells that text and writes nothing past it, so the very next character
/// gets a deferral decision (a sure head defers before any new text). On a byte-level BPE model,
/// whose vocabulary has many tokens that extend a context's last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_handoff_the_healing_token_writes_nothing_unchecked() -> anyhow::Result<()> {
    let root = common::temp_dir("deferral-bpe");
    let dir = common::model_dir(&root, "llama", "byte_level", 21)?;
    let file = head_file(&dir, "sure.safetensors", vec![vec![0.0; HIDDEN]], vec![50.0])?;
    let mut n = node(&dir, Some(&file)).await?;
    let mut c = n.client().await?;
    let never = head_file(&dir, "never.safetensors", vec![vec![0.0; HIDDEN]], vec![-50.0])?;
    let mut m = node(&dir, Some(&never)).await?;
    let mut d = m.client().await?;
    let mut constrained = 0;
    for answer in ["the ca", "once upon a ti", "she sa", "and th", "it wa", "he lo"] {
        let r = c
            .propose_segment(deferring(raw("Tell me a story.", answer, ""), 8, 0.6))
            .await?
            .into_inner();
        assert_eq!(r.finish_reason(), pb::FinishReason::Defer, "{answer:?}: {r:?}");
        assert_eq!(r.text, "", "{answer:?}: the healing token wrote past the context");
        // A head that never defers: the same two steps (healing, one token) with and without a
        // threshold differ where the free healing token would have run past the context.
        let ctx = || raw("Tell me a story.", answer, "");
        let checked = d.propose_segment(deferring(ctx(), 1, 0.6)).await?.into_inner();
        let free = d.propose_segment(greedy(ctx(), 1)).await?.into_inner();
        constrained += usize::from(checked.text != free.text);
    }
    // Not vacuous: unconstrained, healing tokens do run past some of these contexts.
    assert!(constrained > 0, "no healing token ran past its context");
    m.stop().await?;
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_head_changes_nothing_but_reports_every_position() -> anyhow::Result<()> {
    let dir = &dirs()[0];
    let file = head_file(
        dir,
        "never.safetensors",
        vec![pattern(0), pattern(1)],
        vec![-50.0, -60.0],
    )?;
    let mut n = node(dir, Some(&file)).await?;
    let mut c = n.client().await?;
    for (prompt, answer) in [("", ""), ("once upon a time", ""), ("the cat", " sat on")] {
        let plain = c
            .propose_segment(greedy(raw(prompt, answer, ""), 12))
            .await?
            .into_inner();
        // Several at once: the deferral logits ride the batched decode step.
        let calls = (0..3).map(|_| {
            let mut c = c.clone();
            async move {
                c.propose_segment(deferring(raw(prompt, answer, ""), 12, 0.5))
                    .await
            }
        });
        for r in futures_join(calls).await {
            let r = r?.into_inner();
            assert_eq!(r.text, plain.text);
            assert_eq!(r.finish_reason(), plain.finish_reason());
            assert_eq!(r.token_logprobs.len(), plain.token_logprobs.len());
            assert_eq!(r.defer_probs.len(), r.token_logprobs.len(), "{r:?}");
            assert!(r.defer_probs.iter().all(|p| *p < 1e-6));
            assert!(r.defer_head_probs.is_empty());
        }
    }
    n.stop().await?;
    Ok(())
}

/// Runs futures concurrently on the runtime and collects their outputs in order.
async fn futures_join<F, T>(fs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_are_validated() -> anyhow::Result<()> {
    let dir = &dirs()[0];
    let mut bare = node(dir, None).await?;
    let mut c = bare.client().await?;
    let e = c
        .propose_segment(deferring(raw("", "", ""), 4, 0.5))
        .await
        .expect_err("no head");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("start it with --deferral-head FILE"),
        "{}",
        e.message()
    );
    let info = c.info(pb::InfoRequest {}).await?.into_inner();
    assert!(info.deferral_head.is_none());
    bare.stop().await?;

    let file = head_file(dir, "v.safetensors", vec![pattern(2)], vec![0.0])?;
    let mut n = node(dir, Some(&file)).await?;
    let mut c = n.client().await?;
    for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let e = c
            .propose_segment(deferring(raw("", "", ""), 4, bad))
            .await
            .expect_err("out of range");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert!(e.message().contains("defer_threshold"), "{}", e.message());
    }
    n.stop().await?;
    Ok(())
}

#[test]
fn a_head_of_another_hidden_size_stops_the_start() -> anyhow::Result<()> {
    let dir = &dirs()[0];
    let file = head_file(dir, "wide.safetensors", vec![vec![0.1; 48]], vec![0.0])?;
    let err = loaded(dir, Some(&file))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("wide.safetensors") && err.contains("48") && err.contains("32"),
        "{err}"
    );
    // A relative name is found in the model directory; a missing one is an error naming it.
    assert!(loaded(dir, Some(Path::new("wide.safetensors"))).is_err());
    let err = loaded(dir, Some(Path::new("nowhere.safetensors")))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("nowhere.safetensors"), "{err}");
    Ok(())
}

/// σ(h·g + b) for each head from a hidden state.
fn probs(head: &DeferralHead, h: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(head.probs(&h.to_vec1::<f32>()?))
}

#[test]
fn deferral_logits_match_the_hidden_states_on_every_path() -> anyhow::Result<()> {
    for dir in dirs() {
        let file = head_file(
            dir,
            "exact.safetensors",
            vec![pattern(3), pattern(4)],
            vec![0.3, -0.2],
        )?;
        let head = DeferralHead::load(&file)?;
        let node = loaded(dir, Some(&file))?;
        let m = node.engine.model();
        let tokens: Vec<u32> = (0..20).map(|i| 3 + (i * 5) % 20).collect();
        let hidden = m.hidden_states(&tokens)?;
        let n = tokens.len();
        // The prefill's last position: one position against the cache, not written to it.
        let prefix = Tensor::new(&tokens[..n - 1], m.device())?.unsqueeze(0)?;
        let (_, kv) = m.forward(&prefix, &KvCache::default(), false)?;
        let z = m.deferral_after(tokens[n - 1], &kv)?.expect("heads set");
        let want = probs(&head, &hidden.i(n - 1)?)?;
        let got: Vec<f64> = z
            .to_vec1::<f32>()?
            .iter()
            .map(|&z| model_node::deferral::sigmoid(f64::from(z)))
            .collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{}: {got:?} vs {want:?}", dir.display());
        }
        // The batched decode step.
        let step = m.forward_ragged(&[tokens[n - 1]], &[&kv])?;
        let z = step.deferral.expect("heads set").i(0)?;
        let got: Vec<f64> = z
            .to_vec1::<f32>()?
            .iter()
            .map(|&z| model_node::deferral::sigmoid(f64::from(z)))
            .collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{}: {got:?} vs {want:?}", dir.display());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defer_probs_equal_an_independent_greedy_replay() -> anyhow::Result<()> {
    for dir in dirs() {
        let file = head_file(
            dir,
            "replay.safetensors",
            vec![pattern(5), pattern(6)],
            vec![0.1, 0.0],
        )?;
        let head = DeferralHead::load(&file)?;
        let mut n = node(dir, Some(&file)).await?;
        let r = n
            .client()
            .await?
            .propose_segment(deferring(raw("", "", ""), 16, 0.99))
            .await?
            .into_inner();
        n.stop().await?;
        assert_eq!(r.defer_probs.len(), r.token_logprobs.len());

        // Greedy from BOS with the model's hidden states: p at each position, then the argmax over
        // the tokens a proposal may produce (EOS and every token with text).
        let local = loaded(dir, Some(&file))?;
        let (m, codec) = (local.engine.model(), local.engine.codec());
        let vocab = &codec.vocab;
        let allowed: Vec<u32> = (0..vocab.n_rows() as u32)
            .filter(|&t| vocab.is_eos(t) || vocab.token_bytes(t).is_some_and(|b| !b.is_empty()))
            .collect();
        let rendered = codec.render(&model_node::engine::PromptSpec::Raw(String::new()))?;
        let mut seq = codec.encode(&rendered, "")?;
        let mut text = Vec::new();
        for (k, got) in r.defer_probs.iter().enumerate() {
            let hidden = m.hidden_states(&seq)?;
            let h = hidden.i(seq.len() - 1)?;
            let p = probs(&head, &h)?.into_iter().fold(0.0, f64::max);
            assert!(
                (f64::from(*got) - p).abs() < 1e-4,
                "{} position {k}: {got} vs {p}",
                dir.display()
            );
            let logits = m.lm_logits(&h.unsqueeze(0)?)?.squeeze(0)?.to_vec1::<f32>()?;
            let tok = allowed
                .iter()
                .copied()
                .max_by(|a, b| logits[*a as usize].total_cmp(&logits[*b as usize]))
                .unwrap_or(0);
            if vocab.is_eos(tok) {
                break;
            }
            text.extend_from_slice(vocab.token_bytes(tok).unwrap_or_default());
            seq.push(tok);
        }
        assert_eq!(String::from_utf8_lossy(&text), r.text, "{}", dir.display());
    }
    Ok(())
}
