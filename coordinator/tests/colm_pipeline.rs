//! Co-LLM and FSLM pipelines over the three bundled models on real sockets: the generalist serves its
//! trained deferral head (`models/general/deferral.safetensors`); bad options are refused with
//! `INVALID_ARGUMENT` naming the field before any node is called; answers are spans/stages whose
//! counts match the node calls exactly; a failed assistant or stage member does not lose the request.

mod common;

use std::time::Duration;

use common::{Node, bundled_dirs, model_args, start};
use coordinator::evaluate::load_set;
use coordinator::service::{Coordinator, NodeSpec};
use ensemble_proto::v1 as pb;
use tonic::Code;

/// The bundled members (arith, atlas, general), the generalist with its deferral head.
async fn bundled_with_head() -> anyhow::Result<(Vec<Node>, Coordinator)> {
    let (mut nodes, mut specs) = (Vec::new(), Vec::new());
    for (name, dir) in bundled_dirs() {
        let node = if name == "general" {
            let head = model_node::config::DeferralArgs {
                deferral_head: Some(dir.join("deferral.safetensors")),
            };
            let opts = model_node::server::ServeOptions {
                grace: Duration::from_secs(1),
                ..Default::default()
            };
            common::start_model_with(model_args(dir), &head, opts).await?
        } else {
            start(dir).await?
        };
        specs.push(NodeSpec {
            name,
            url: node.url.clone(),
            weight: 1.0,
        });
        nodes.push(node);
    }
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    Ok((nodes, c))
}

fn request(prompt: pb::Prompt, strategy: &str, max_chars: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt),
        strategy: strategy.into(),
        max_chars,
        ..Default::default()
    }
}

fn raw(text: &str) -> pb::Prompt {
    pb::Prompt {
        kind: Some(pb::prompt::Kind::Raw(text.into())),
    }
}

fn stage(name: &str, node: &str, template: &str) -> pb::PipelineStage {
    pb::PipelineStage {
        name: name.into(),
        node: node.into(),
        template: template.into(),
        ..Default::default()
    }
}

/// No node RPC has been made through the coordinator (Info probes are not node RPCs).
fn no_node_calls(c: &Coordinator) -> bool {
    !c.metrics().render().contains("ensemble_node_rpcs_total{")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_options_are_the_clients_fault_and_call_no_node() -> anyhow::Result<()> {
    let (_nodes, c) = bundled_with_head().await?;
    let colm = |o: pb::CoLlmOptions| pb::GenerateRequest {
        colm: Some(o),
        ..request(raw("What is 3 + 4?"), "colm", 16)
    };
    let pipeline = |stages: Vec<pb::PipelineStage>| pb::GenerateRequest {
        pipeline: Some(pb::PipelineOptions { stages }),
        ..request(raw("What is 3 + 4?"), "pipeline", 16)
    };
    let cases = [
        (
            colm(pb::CoLlmOptions {
                assistants: vec!["nobody".into()],
                ..Default::default()
            }),
            "colm.assistants",
        ),
        (
            colm(pb::CoLlmOptions {
                base: Some("atlas".into()),
                ..Default::default()
            }),
            "has no deferral head",
        ),
        (
            colm(pb::CoLlmOptions {
                assistants: vec!["general".into()],
                ..Default::default()
            }),
            "is the base",
        ),
        (
            colm(pb::CoLlmOptions {
                eta: Some(1.5),
                ..Default::default()
            }),
            "colm.eta",
        ),
        (
            colm(pb::CoLlmOptions {
                handoff: Some("sentence".into()),
                ..Default::default()
            }),
            "colm.handoff",
        ),
        (
            colm(pb::CoLlmOptions {
                segment_tokens: Some(0),
                ..Default::default()
            }),
            "colm.segment_tokens",
        ),
        (pipeline(vec![]), "pipeline.stages"),
        (
            pipeline(vec![stage("a", "nobody", "{{ request }}")]),
            "pipeline.stages[0].node",
        ),
        (
            pipeline(vec![stage("a", "general", "  ")]),
            "pipeline.stages[0].template",
        ),
        (
            pipeline(vec![stage("a", "general", "{{ request ")]),
            "pipeline.stages[0].template",
        ),
        (
            pipeline(vec![
                stage("a", "general", "{{ request }}"),
                pb::PipelineStage {
                    route: vec![pb::PipelineRoute {
                        pattern: "(".into(),
                        node: "arith".into(),
                    }],
                    ..stage("b", "general", "{{ previous }}")
                },
            ]),
            "pipeline.stages[1].route[0].pattern",
        ),
        (
            pipeline(vec![pb::PipelineStage {
                route: vec![pb::PipelineRoute {
                    pattern: "x".into(),
                    node: "arith".into(),
                }],
                ..stage("a", "general", "{{ request }}")
            }]),
            "no previous output",
        ),
        (
            pipeline(vec![
                stage("a", "general", "{{ request }}"),
                stage("a", "arith", "{{ request }}"),
            ]),
            "names two stages",
        ),
    ];
    let mut cases = cases.to_vec();
    cases.push((
        pb::GenerateRequest {
            rtd_lambda: Some(1.0),
            ..request(raw("x"), "colm", 8)
        },
        "rtd_lambda",
    ));
    for (req, want) in cases {
        let e = c.run(req, &mut |_| true).await.expect_err(want);
        assert_eq!(e.code(), Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().contains(want), "{want}: {}", e.message());
        assert!(!e.message().contains("panicked"), "{}", e.message());
    }
    assert!(no_node_calls(&c), "{}", c.metrics().render());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn colm_answers_are_spans_of_one_call_each_and_the_base_defers() -> anyhow::Result<()> {
    let (_nodes, c) = bundled_with_head().await?;
    let set = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    let mut deferrals = 0;
    for (k, it) in set.iter().take(9).enumerate() {
        let handoff = if k % 2 == 0 { "token" } else { "word" };
        let req = pb::GenerateRequest {
            colm: Some(pb::CoLlmOptions {
                handoff: Some(handoff.into()),
                ..Default::default()
            }),
            ..request(it.prompt(), "colm", 48)
        };
        let mut streamed = String::new();
        let mut steps = 0u32;
        let r = c
            .run(req, &mut |s| {
                if let coordinator::Step::Span(sp) = s {
                    streamed.push_str(&sp.text);
                    steps += 1;
                }
                true
            })
            .await?;
        assert!(r.failed_nodes.is_empty(), "{:?}", r.failed_nodes);
        // Every call wrote one span (no failures here), and the spans are the answer.
        assert_eq!(r.node_calls as usize, r.spans.len(), "{it:?}");
        assert_eq!(r.round_trips, r.node_calls);
        assert_eq!((r.steps, steps), (r.spans.len() as u32, r.spans.len() as u32));
        let spelled: String = r.spans.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(spelled, streamed);
        match ensemble_proto::reasoning::split(&spelled) {
            Some((reasoning, answer)) => {
                assert_eq!((reasoning, answer), (r.reasoning.as_str(), r.text.as_str()))
            }
            None => assert_eq!(spelled, r.text),
        }
        assert_eq!(
            r.deferrals as usize,
            r.spans.iter().filter(|s| s.deferred).count()
        );
        for s in &r.spans {
            if s.deferred {
                assert!(["arith", "atlas"].contains(&s.node.as_str()), "{s:?}");
                assert!(s.defer_prob > 0.0 && s.defer_prob <= 1.0, "{s:?}");
            } else {
                assert_eq!(s.node, "general");
                assert!(s.defer_probs.iter().all(|p| (0.0..=1.0).contains(p)), "{s:?}");
            }
        }
        deferrals += r.deferrals;
    }
    // The trained head hands over on this kind of question (17.7% of arithmetic tokens, 44.8% of
    // atlas tokens on its validation split).
    assert!(deferrals > 0, "no deferral in 9 answers");
    let m = c.metrics().render();
    assert!(
        m.contains("ensemble_colm_spans_total{writer=\"assistant\"}"),
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_assistant_does_not_lose_the_request() -> anyhow::Result<()> {
    let (mut nodes, c) = bundled_with_head().await?;
    let set = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    // Stop both assistants: every handoff fails, the base writes on alone.
    for n in nodes.iter_mut().take(2) {
        if let Some(tx) = n.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut n.task).await;
    }
    let mut failed = 0;
    for it in set.iter().take(6) {
        let r = c.run(request(it.prompt(), "colm", 48), &mut |_| true).await?;
        assert!(!r.text.is_empty() || !r.reasoning.is_empty(), "{it:?}");
        assert!(
            r.spans.iter().all(|s| !s.deferred && s.node == "general"),
            "{r:?}"
        );
        assert_eq!(r.deferrals, 0);
        failed += r.failed_nodes.len();
    }
    assert!(failed > 0, "no handoff was tried");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_runs_its_stages_in_order_routes_and_falls_back() -> anyhow::Result<()> {
    let (mut nodes, c) = bundled_with_head().await?;
    let question = "What is 12 + 30?";
    let stages = vec![
        pb::PipelineStage {
            max_chars: 24,
            ..stage("draft", "general", "{{ request }}")
        },
        pb::PipelineStage {
            // Any draft at all routes the answer to the arithmetic specialist.
            route: vec![pb::PipelineRoute {
                pattern: "(?s).".into(),
                node: "arith".into(),
            }],
            ..stage("answer", "general", "{{ request }} (draft: {{ stages.draft }})")
        },
    ];
    let req = || pb::GenerateRequest {
        pipeline: Some(pb::PipelineOptions {
            stages: stages.clone(),
        }),
        ..request(raw(question), "pipeline", 32)
    };
    let mut seen = Vec::new();
    let r = c
        .run(req(), &mut |s| {
            if let coordinator::Step::Stage(st) = s {
                seen.push(st.name.clone());
            }
            true
        })
        .await?;
    assert_eq!(seen, ["draft", "answer"]);
    assert_eq!(r.stages.len(), 2);
    let (draft, answer) = (&r.stages[0], &r.stages[1]);
    assert_eq!((draft.node.as_str(), answer.node.as_str()), ("general", "arith"));
    assert!(draft.text.chars().count() <= 24, "{draft:?}");
    assert_eq!(answer.prompt, format!("{question} (draft: {})", draft.text));
    assert!(!answer.fallback && r.failed_nodes.is_empty());
    // The last stage's output is the answer; each stage was one call per 32-token segment.
    let full = if r.reasoning.is_empty() {
        r.text.clone()
    } else {
        format!("<think>{}</think>{}", r.reasoning, r.text)
    };
    assert_eq!(answer.text, full);
    assert_eq!(r.round_trips, r.node_calls);

    // The routed member goes away: without a fallback the request fails naming the stage; with
    // one, the fallback runs the stage.
    if let Some(tx) = nodes[0].stop.take() {
        let _ = tx.send(());
    }
    let _ = (&mut nodes[0].task).await;
    let e = c.run(req(), &mut |_| true).await.expect_err("arith is gone");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("\"answer\""), "{}", e.message());
    let mut with_fallback = stages.clone();
    with_fallback[1].fallback = "atlas".into();
    let r = c
        .run(
            pb::GenerateRequest {
                pipeline: Some(pb::PipelineOptions {
                    stages: with_fallback,
                }),
                ..request(raw(question), "pipeline", 32)
            },
            &mut |_| true,
        )
        .await?;
    assert_eq!(r.stages[1].node, "atlas");
    assert!(r.stages[1].fallback);
    assert_eq!(r.failed_nodes, ["arith"]);
    Ok(())
}
