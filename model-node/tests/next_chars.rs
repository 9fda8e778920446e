//! `NextCharDistributions` over real gRPC: every position of a continuation, and the node's own
//! greedy draft, equal what `NextCharDistribution` answers when the same characters are appended one
//! call at a time (for all three tokenizer kinds, with and without look-ahead), and a session resumes
//! from the accepted prefix.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{TestNode, chat, delta};
use ensemble_proto::v1 as pb;
use tonic::Code;

fn dirs() -> &'static [PathBuf; 3] {
    static DIRS: OnceLock<[PathBuf; 3]> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = common::temp_dir("next_chars");
        let mk = |arch, kind, seed| common::model_dir(&root, arch, kind, seed).expect("model dir");
        [
            mk("qwen2", "byte_level", 1),
            mk("llama", "sentencepiece", 2),
            mk("gemma2", "char", 3),
        ]
    })
}

type Client = pb::model_node_client::ModelNodeClient<tonic::transport::Channel>;

fn one(ctx: Option<pb::Context>, lookahead: bool) -> pb::NextCharRequest {
    pb::NextCharRequest {
        context: ctx,
        top_k: 32,
        max_hypotheses: None,
        lookahead: Some(lookahead),
    }
}

fn run(ctx: Option<pb::Context>, continuation: &str, draft: u32, lookahead: bool) -> pb::NextCharsRequest {
    pb::NextCharsRequest {
        context: ctx,
        continuation: continuation.into(),
        draft_chars: draft,
        top_k: 32,
        max_hypotheses: None,
        lookahead: Some(lookahead),
        observed: true,
    }
}

fn as_dist(r: pb::NextCharResponse) -> pb::CharDistribution {
    pb::CharDistribution {
        chars: r.chars,
        eos_prob: r.eos_prob,
        residual: r.residual,
        observed: None,
    }
}

fn same(a: &pb::CharDistribution, b: &pb::CharDistribution, what: &str) {
    let names = |d: &pb::CharDistribution| d.chars.iter().map(|c| c.char.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: listed characters");
    for (x, y) in a.chars.iter().zip(&b.chars) {
        assert!(
            (x.prob - y.prob).abs() < 1e-12,
            "{what}: P({}) {} vs {}",
            x.char,
            x.prob,
            y.prob
        );
    }
    assert!((a.eos_prob - b.eos_prob).abs() < 1e-12, "{what}: eos");
    assert!((a.residual - b.residual).abs() < 1e-12, "{what}: residual");
}

/// The node's greedy rule: the most likely character unless EOS is at least as likely.
fn greedy_char(d: &pb::CharDistribution) -> Option<String> {
    let best = d.chars.iter().max_by(|a, b| a.prob.total_cmp(&b.prob))?;
    (best.prob > d.eos_prob).then(|| best.char.clone())
}

/// Distributions after each prefix of `text`, one NextCharDistribution call per character.
async fn one_by_one(
    c: &mut Client,
    session: &str,
    answer: &str,
    text: &str,
    lookahead: bool,
) -> anyhow::Result<Vec<pb::CharDistribution>> {
    let mut out = vec![as_dist(
        c.next_char_distribution(one(chat("tell me", answer, session), lookahead))
            .await?
            .into_inner(),
    )];
    let start = answer.chars().count() as u64;
    for (base, ch) in (start..).zip(text.chars()) {
        let d = c
            .next_char_distribution(one(delta(session, base, &ch.to_string()), lookahead))
            .await?
            .into_inner();
        out.push(as_dist(d));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_position_equals_the_one_by_one_answer() -> anyhow::Result<()> {
    let text = "the cat sat, é!";
    for (i, dir) in dirs().iter().enumerate() {
        let mut n = TestNode::start(common::model_args(dir), common::limits()).await?;
        let mut c = n.client().await?;
        for lookahead in [true, false] {
            let what = format!("kind {i} lookahead {lookahead}");
            let want = one_by_one(&mut c, &format!("a{lookahead}"), "Once", text, lookahead).await?;
            let got = c
                .next_char_distributions(run(
                    chat("tell me", "Once", &format!("b{lookahead}")),
                    text,
                    0,
                    lookahead,
                ))
                .await?
                .into_inner();
            assert_eq!(got.positions.len(), text.chars().count() + 1, "{what}");
            assert!(got.drafted.is_empty());
            for (j, (g, w)) in got.positions.iter().zip(&want).enumerate() {
                same(g, w, &format!("{what} position {j}"));
            }
            // Each continuation character is priced exactly: its listed probability where the top 32
            // list it, within the residual where they do not; nothing after the end.
            for ((j, g), ch) in got.positions.iter().enumerate().zip(text.chars()) {
                let p = g.observed.unwrap_or(f64::NAN);
                match g.chars.iter().find(|c| c.char == ch.to_string()) {
                    Some(c) => assert!(
                        (p - c.prob).abs() < 1e-12,
                        "{what} position {j}: {p} vs {}",
                        c.prob
                    ),
                    None => assert!(
                        p >= 0.0 && p <= g.residual + 1e-12,
                        "{what} position {j}: {p} > residual"
                    ),
                }
            }
            assert_eq!(got.positions.last().and_then(|d| d.observed), None, "{what}");

            // The node's own draft is its greedy chain, and its positions are the chain's answers.
            let got = c
                .next_char_distributions(run(
                    chat("tell me", "Once", &format!("c{lookahead}")),
                    "",
                    12,
                    lookahead,
                ))
                .await?
                .into_inner();
            let mut chain = String::new();
            for d in &got.positions[..got.positions.len() - 1] {
                chain.push_str(&greedy_char(d).expect("a drafted position has a greedy character"));
            }
            assert_eq!(chain, got.drafted, "{what}");
            assert!(
                got.drafted.chars().count() == 12
                    || greedy_char(got.positions.last().expect("position 0 at least")).is_none()
            );
            let want = one_by_one(&mut c, &format!("d{lookahead}"), "Once", &got.drafted, lookahead).await?;
            for (j, (g, w)) in got.positions.iter().zip(&want).enumerate() {
                same(g, w, &format!("{what} drafted position {j}"));
            }
        }
        n.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_from_the_accepted_prefix() -> anyhow::Result<()> {
    let mut n = TestNode::start(common::model_args(&dirs()[0]), common::limits()).await?;
    let mut c = n.client().await?;
    let want = one_by_one(&mut c, "ref", "", "the cab", true).await?;
    // A draft "the cat" of which "the ca" is accepted and "b" appended instead of "t".
    let r = c
        .next_char_distributions(run(chat("tell me", "", "spec"), "the cat", 0, true))
        .await?
        .into_inner();
    for (j, (g, w)) in r.positions.iter().zip(&want).take(7).enumerate() {
        same(g, w, &format!("position {j}"));
    }
    let d = c
        .next_char_distribution(one(delta("spec", 0, "the cab"), true))
        .await?
        .into_inner();
    same(&as_dist(d), &want[7], "after the accepted prefix");
    // A continuation call leaves the session's answer as it was: 7 characters, not 10.
    c.next_char_distributions(run(delta("spec", 7, ""), "xyz", 0, true))
        .await?;
    let d = c
        .next_char_distribution(one(delta("spec", 7, ""), true))
        .await?
        .into_inner();
    same(
        &as_dist(d),
        &want[7],
        "after a continuation that was not accepted",
    );
    n.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_continuation_requests_are_invalid_argument() -> anyhow::Result<()> {
    let mut n = TestNode::start(common::model_args(&dirs()[2]), common::limits()).await?;
    let mut c = n.client().await?;
    let cases = [
        (
            run(chat("hi", "", ""), &"a".repeat(1025), 0, true),
            "continuation",
        ),
        (run(chat("hi", "", ""), "", 257, true), "draft_chars"),
        (
            pb::NextCharsRequest {
                top_k: 0,
                ..run(chat("hi", "", ""), "a", 0, true)
            },
            "top_k",
        ),
        (run(None, "a", 0, true), "context"),
    ];
    for (req, field) in cases {
        let e = c.next_char_distributions(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    n.stop().await?;
    Ok(())
}
