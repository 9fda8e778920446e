//! Walks (`NextCharDistribution`, `NextCharDistributions`, string-prefix `ScoreCandidates`) run as
//! resumable computations on the engine thread: their forward passes join the engine's batched
//! steps, with each other and beside running decodes. Over real gRPC, on three architectures and
//! tokenizers (byte-level BPE, SentencePiece with byte fallback, characters): the same calls on eight
//! sessions give bit for bit the same answers one session at a time, all eight at once, and all
//! eight at once while eight proposals decode; in the last case the walks' positions are counted
//! inside the decode passes (`ensemble_node_decode_merged_walk_rows_total`).

mod common;

use common::{TestNode, delta, limits, model_args, model_dir, raw, sample};
use ensemble_proto::v1 as pb;

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?)
}

/// A distribution as bits: each listed character with its probability, EOS, the residual.
fn dist_bits(chars: &[pb::CharProb], eos: f64, residual: f64, out: &mut Vec<(String, u64)>) {
    for c in chars {
        out.push((c.char.clone(), c.prob.to_bits()));
    }
    out.push(("<eos>".into(), eos.to_bits()));
    out.push(("<rest>".into(), residual.to_bits()));
}

/// One session's calls, in order, and every number they answer (as bits): the distributions along
/// a continuation with a multi-byte character (observed, and a greedy draft after it), the next
/// character after two deltas, string-prefix scores of drafts that end inside words, and the
/// published CharED variant (a rebuild from the canonical tokens).
async fn session_calls(addr: std::net::SocketAddr, i: u32, tag: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut c = pb::model_node_client::ModelNodeClient::connect(format!("http://{addr}")).await?;
    let id = format!("{tag}-{i}");
    let mut out = Vec::new();
    let run = c
        .next_char_distributions(pb::NextCharsRequest {
            context: raw(&format!("Story {i}: the river"), "", &id),
            continuation: " went é down".into(),
            draft_chars: 6,
            top_k: 8,
            observed: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    for p in &run.positions {
        dist_bits(&p.chars, p.eos_prob, p.residual, &mut out);
        out.push(("<observed>".into(), p.observed.unwrap_or(-1.0).to_bits()));
    }
    out.push((run.drafted.clone(), 0));
    let mut base = 0;
    for (append, top_k) in [(" went", 16), (" é d", 4)] {
        let d = c
            .next_char_distribution(pb::NextCharRequest {
                context: delta(&id, base, append),
                top_k,
                ..Default::default()
            })
            .await?
            .into_inner();
        dist_bits(&d.chars, d.eos_prob, d.residual, &mut out);
        base += append.chars().count() as u64;
    }
    let scores = c
        .score_candidates(pb::ScoreRequest {
            context: raw(&format!("Story {i}: the river"), " went é d", &id),
            candidates: vec!["own".into(), "o".into(), "own the riv".into()],
            string_prefix: true,
            ends_answer: vec![false, false, true],
        })
        .await?
        .into_inner();
    for s in &scores.scores {
        out.push((format!("score {}", s.token_count), s.sum_logprob.to_bits()));
    }
    let published = c
        .next_char_distribution(pb::NextCharRequest {
            context: raw(&format!("Story {i}: the river"), " went é d", &id),
            top_k: 8,
            max_hypotheses: Some(1),
            lookahead: Some(false),
        })
        .await?
        .into_inner();
    dist_bits(&published.chars, published.eos_prob, published.residual, &mut out);
    c.close_session(pb::CloseSessionRequest { session_id: id })
        .await?;
    Ok(out)
}

/// Eight sessions' calls at once (each session's own calls in order).
async fn all_sessions(addr: std::net::SocketAddr, tag: &str) -> anyhow::Result<Vec<Vec<(String, u64)>>> {
    let handles: Vec<_> = (0..8u32)
        .map(|i| {
            let tag = tag.to_owned();
            tokio::spawn(async move { session_calls(addr, i, &tag).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

/// Eight long greedy proposals at once.
async fn proposals(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let handles: Vec<_> = (0..8u32)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = pb::model_node_client::ModelNodeClient::connect(format!("http://{addr}")).await?;
                let r = common::greedy(raw(&format!("Tale {i}: a boat"), "", ""), 48);
                anyhow::Ok(c.propose_segment(r).await?.into_inner())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok(())
}

/// The architectures and tokenizers every test here runs on: byte-level BPE, SentencePiece with
/// byte fallback, characters.
const ARCHS: [(&str, &str); 3] = [
    ("llama", "byte_level"),
    ("qwen2", "sentencepiece"),
    ("phi3", "char"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn walks_share_passes_with_each_other_and_with_decodes_and_answer_as_alone() -> anyhow::Result<()> {
    let root = common::temp_dir("walks");
    for (i, &(arch, kind)) in ARCHS.iter().enumerate() {
        let dir = model_dir(&root.join(arch), arch, kind, 80 + i as u64)?;
        let (mut node, maddr) = TestNode::start_with_metrics(model_args(&dir), limits()).await?;
        let addr = node.addr;
        let mut alone = Vec::new();
        for s in 0..8u32 {
            alone.push(session_calls(addr, s, "alone").await?);
        }
        assert!(
            alone.iter().all(|a| a.len() > 40),
            "{arch}: every session answered"
        );
        let together = all_sessions(addr, "together").await?;
        for (s, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "{arch}: session {s} differs when the sessions run at once");
        }
        let m = scrape(maddr).await?;
        let before = sample(&m, "ensemble_node_decode_merged_walk_rows_total", &[]).unwrap_or(-1.0);
        assert_eq!(
            before, 0.0,
            "{arch}: no proposal ran, so no walk shared a decode pass"
        );

        // Again and again while proposals decode, until some walk shared a decode pass.
        let mut merged = 0.0;
        for round in 0..5 {
            let decoding = tokio::spawn(proposals(addr));
            let beside = all_sessions(addr, &format!("beside{round}")).await?;
            decoding.await??;
            for (s, (a, b)) in alone.iter().zip(&beside).enumerate() {
                assert_eq!(a, b, "{arch}: session {s} differs beside decodes (round {round})");
            }
            let m = scrape(maddr).await?;
            merged = sample(&m, "ensemble_node_decode_merged_walk_rows_total", &[]).unwrap_or(0.0);
            if merged > 0.0 {
                break;
            }
        }
        assert!(
            merged > 0.0,
            "{arch}: no walk shared a decode pass in five rounds"
        );
        node.stop().await?;
    }
    Ok(())
}

/// String-prefix scores of candidates that share prefixes (and one that ends the answer): all in
/// one call, where the candidates' walks run side by side and their passes are shared, each scores
/// bit for bit what it scores alone in a call of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_prefix_candidates_side_by_side_score_as_alone() -> anyhow::Result<()> {
    let root = common::temp_dir("walks-prefix");
    let cands = [
        " down the",
        " do",
        " dow",
        "wn",
        " a boat",
        " é d",
        " down the river",
    ];
    let ends = [false, false, false, false, false, false, true];
    for (i, &(arch, kind)) in ARCHS.iter().enumerate() {
        let dir = model_dir(&root.join(arch), arch, kind, 90 + i as u64)?;
        let mut node = TestNode::start(model_args(&dir), limits()).await?;
        let mut c = node.client().await?;
        let score = |session: &str, idx: Vec<usize>| pb::ScoreRequest {
            context: raw("Story: the river", " went", session),
            candidates: idx.iter().map(|&k| cands[k].to_owned()).collect(),
            string_prefix: true,
            ends_answer: idx.iter().map(|&k| ends[k]).collect(),
        };
        let together = c
            .score_candidates(score("together", (0..cands.len()).collect()))
            .await?
            .into_inner();
        assert_eq!(together.scores.len(), cands.len());
        for (k, got) in together.scores.iter().enumerate() {
            let alone = c
                .score_candidates(score(&format!("alone-{k}"), vec![k]))
                .await?
                .into_inner();
            let want = &alone.scores[0];
            assert_eq!(
                (got.sum_logprob.to_bits(), got.token_count),
                (want.sum_logprob.to_bits(), want.token_count),
                "{arch}: candidate {:?} scores {} beside the others, {} alone",
                cands[k],
                got.sum_logprob,
                want.sum_logprob
            );
            assert!(got.sum_logprob < 0.0, "{arch}: {:?}", cands[k]);
        }
        node.stop().await?;
    }
    Ok(())
}
