//! Checks against real material in `../shared/real` (skipped with a note when it is absent): the
//! stories260K Llama checkpoint reproduces llama2.c's greedy output, in-process and over gRPC.

mod common;

use std::path::PathBuf;

use ensemble_proto::v1 as pb;
use model_node::engine::{ContextBody, ContextSpec, Job, PromptSpec, ProposeParams, Reply};
use model_node::sampling::SamplingParams;

fn stories() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/real/models/stories260K"
    ));
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

fn reference(dir: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(dir.join("reference_greedy_runc.txt"))?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
}

#[test]
fn stories260k_greedy_matches_llama2c_in_process() -> anyhow::Result<()> {
    let Some(dir) = stories() else { return Ok(()) };
    let mut engine = model_node::node::load(&common::model_args(&dir), &common::limits())?.engine;
    let job = Job::Propose(
        ContextSpec {
            session: String::new(),
            body: ContextBody::Full {
                prompt: PromptSpec::Raw(String::new()),
                answer: String::new(),
            },
            rtd_lambda: None,
        },
        ProposeParams {
            max_new_tokens: 256,
            stop: vec![],
            sampling: SamplingParams::default(),
            defer_threshold: None,
        },
    );
    let Reply::Proposal(p) = engine.run(job, 0.0, &|| false)? else {
        anyhow::bail!("wrong reply")
    };
    assert_eq!(p.text, reference(&dir)?);
    assert_eq!(p.token_logprobs.len(), 256);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stories260k_greedy_matches_llama2c_over_grpc() -> anyhow::Result<()> {
    let Some(dir) = stories() else { return Ok(()) };
    let mut node = common::TestNode::start(common::model_args(&dir), common::limits()).await?;
    let mut c = node.client().await?;
    let p = c
        .propose_segment(common::greedy(common::raw("", "", ""), 256))
        .await?
        .into_inner();
    assert_eq!(p.text, reference(&dir)?);
    assert_eq!(p.finish_reason(), pb::FinishReason::Length);
    // In 4 rounds of 64 tokens through a session, each round appending the previous draft as a delta.
    let mut answer = String::new();
    let mut last = String::new();
    for round in 0..4 {
        let ctx = if round == 0 {
            common::raw("", "", "story")
        } else {
            let base = (answer.chars().count() - last.chars().count()) as u64;
            common::delta("story", base, &last)
        };
        let r = c.propose_segment(common::greedy(ctx, 64)).await?.into_inner();
        answer.push_str(&r.text);
        last = r.text;
    }
    assert!(
        reference(&dir)?.starts_with(&answer[..answer.len().min(200)]),
        "{answer}"
    );
    node.stop().await?;
    Ok(())
}
