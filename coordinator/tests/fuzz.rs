//! Fuzz targets of the coordinator, as proptest-driven soaks: each target draws random inputs for
//! `FUZZ_SECONDS` seconds (default 2; `tests/fuzz/run.sh` runs them longer) and fails on the first
//! panic or broken rule, printing the input. Run one with
//! `FUZZ_SECONDS=600 cargo test --release -p coordinator --test fuzz TARGET -- --nocapture`.
//!
//! - `generate_requests`: decoded `GenerateRequest`s (structured, and bytes mutated from valid
//!   encodings) through the coordinator's validation and strategies, against members that refuse
//!   connections: every answer is a status whose code says whose fault it is, never INTERNAL/UNKNOWN.
//! - `http_bodies`: arbitrary bytes, arbitrary JSON and mutated valid OpenAI bodies posted to the HTTP
//!   router: never a 500, every error in OpenAI's shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::config::{NodeConfig, Settings};
use coordinator::replicas::SystemResolver;
use coordinator::service::{Coordinator, NodeSpec};
use ensemble_proto::v1 as pb;
#[path = "../../tests/fuzz/shared.rs"]
mod shared;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use prost::Message as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// Draws from `strategy` until the budget is spent, awaiting `check` on each; a panic prints the
/// input and fails the target.
async fn soak<S, F, Fut>(name: &str, strategy: S, check: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug + Clone + Send + 'static,
    F: Fn(S::Value) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut runner = TestRunner::default();
    let (start, budget) = (Instant::now(), shared::budget());
    let mut cases = 0u64;
    while start.elapsed() < budget {
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        let input = tree.current();
        let shown = input.clone();
        // A task: a panic inside is caught and reported with the input.
        if let Err(e) = tokio::spawn(check(input)).await {
            panic!("fuzz {name}: crash on input {shown:?}: {e}");
        }
        cases += 1;
    }
    println!(
        "fuzz {name}: {cases} cases in {:.0} s, 0 crashes",
        start.elapsed().as_secs_f64()
    );
}

/// A coordinator whose three members refuse connections (a closed port): validation runs fully,
/// node calls fail fast.
async fn coordinator() -> anyhow::Result<Arc<Coordinator>> {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let members: Vec<NodeConfig> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            NodeSpec {
                name: (*n).into(),
                url: format!("http://{closed}"),
                weight: 1.0,
            }
            .into()
        })
        .collect();
    let mut s = Settings::new(members);
    s.deadline = Duration::from_millis(500);
    s.probe_every = Duration::ZERO;
    Ok(Arc::new(Coordinator::start(s, Arc::new(SystemResolver)).await?))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,16}", "[a-z ]{0,24}", Just(String::new())]
}

fn arb_f(v: f64) -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(v),
        Just(f64::NAN),
        Just(-1.0),
        Just(0.0),
        0.0..2.0
    ]
}

fn arb_generate() -> impl Strategy<Value = pb::GenerateRequest> {
    let prompt = proptest::option::of(prop_oneof![
        text().prop_map(|t| pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw(t))
        }),
        proptest::collection::vec((prop_oneof![Just("user".to_owned()), ".{0,8}"], text()), 0..4).prop_map(
            |m| pb::Prompt {
                kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                    messages: m
                        .into_iter()
                        .map(|(role, content)| pb::ChatMessage { role, content })
                        .collect()
                }))
            }
        ),
        Just(pb::Prompt { kind: None }),
    ]);
    let strategy = prop_oneof![
        Just(String::new()),
        Just("specfuse".to_owned()),
        Just("chared".to_owned()),
        Just("single:a".to_owned()),
        Just("colm".to_owned()),
        Just("pipeline".to_owned()),
        "single:.{0,4}",
        ".{0,12}",
    ];
    let sampling = proptest::option::of(
        (
            any::<f32>(),
            proptest::option::of(any::<f32>()),
            proptest::option::of(0u32..4),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(temperature, top_p, top_k, seed)| pb::Sampling {
                temperature,
                top_p,
                top_k,
                seed,
            }),
    );
    let specfuse = proptest::option::of(
        (
            proptest::option::of(0u32..5000),
            proptest::option::of(arb_f(0.5)),
            proptest::option::of(arb_f(1.0)),
            proptest::collection::vec(arb_f(1.0), 0..4),
            proptest::option::of(0u32..5),
        )
            .prop_map(|(segment_tokens, exit_delta, exit_tau, weights, min_active)| {
                pb::SpecFuseOptions {
                    segment_tokens,
                    exit_delta,
                    exit_tau,
                    weights,
                    min_active,
                    ..Default::default()
                }
            }),
    );
    let chared = proptest::option::of(
        (
            proptest::option::of(arb_f(0.0)),
            proptest::option::of(arb_f(1.0)),
            proptest::collection::vec(arb_f(1.0), 0..4),
        )
            .prop_map(|(temperature, top_p, weights)| pb::CharEdOptions {
                temperature,
                top_p,
                weights,
                ..Default::default()
            }),
    );
    let member = || prop_oneof![Just("a".to_owned()), Just("b".to_owned()), ".{0,4}"];
    let colm = proptest::option::of(
        (
            proptest::option::of(member()),
            proptest::collection::vec(member(), 0..3),
            proptest::option::of(arb_f(0.5)),
            proptest::option::of(prop_oneof![
                Just("token".to_owned()),
                Just("word".to_owned()),
                ".{0,6}"
            ]),
            proptest::option::of(0u32..5000),
        )
            .prop_map(
                |(base, assistants, eta, handoff, segment_tokens)| pb::CoLlmOptions {
                    base,
                    assistants,
                    eta,
                    handoff,
                    segment_tokens,
                },
            ),
    );
    let stage = (
        ".{0,6}",
        member(),
        prop_oneof![
            Just("{{ request }}".to_owned()),
            Just("{{ previous }}".to_owned()),
            ".{0,24}"
        ],
        prop_oneof![0u32..300, any::<u32>()],
        prop_oneof![Just(String::new()), member()],
        proptest::collection::vec(
            (prop_oneof![Just("^[0-9]".to_owned()), ".{0,8}"], member())
                .prop_map(|(pattern, node)| pb::PipelineRoute { pattern, node }),
            0..3,
        ),
    )
        .prop_map(
            |(name, node, template, max_chars, fallback, route)| pb::PipelineStage {
                name,
                node,
                template,
                max_chars,
                fallback,
                route,
            },
        );
    let pipeline = proptest::option::of(
        proptest::collection::vec(stage, 0..4).prop_map(|stages| pb::PipelineOptions { stages }),
    );
    (
        prompt,
        strategy,
        prop_oneof![0u32..40, any::<u32>()],
        proptest::collection::vec(text(), 0..3),
        sampling,
        specfuse,
        chared,
        colm,
        pipeline,
        proptest::option::of(arb_f(0.5)),
    )
        .prop_map(
            |(prompt, strategy, max_chars, stop, sampling, specfuse, chared, colm, pipeline, rtd_lambda)| {
                pb::GenerateRequest {
                    prompt,
                    strategy,
                    max_chars,
                    stop,
                    sampling,
                    specfuse,
                    chared,
                    colm,
                    pipeline,
                    rtd_lambda,
                }
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_requests() -> anyhow::Result<()> {
    let c = coordinator().await?;
    let edits = proptest::collection::vec((any::<u16>(), any::<u8>(), any::<u8>()), 0..4);
    let codes = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<String, u64>::new(),
    ));
    let seen = codes.clone();
    soak(
        "generate_requests",
        (arb_generate(), edits),
        move |(req, edits)| {
            let c = c.clone();
            let seen = seen.clone();
            async move {
                let Ok(req) =
                    pb::GenerateRequest::decode(shared::mutate(req.encode_to_vec(), &edits).as_slice())
                else {
                    return;
                };
                let out = tokio::time::timeout(Duration::from_secs(10), c.run(req.clone(), &mut |_| true))
                    .await
                    .unwrap_or_else(|_| panic!("no answer within 10 s"));
                let code = out.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                if let Ok(mut m) = seen.lock() {
                    *m.entry(ensemble_proto::status_name(code).to_owned()).or_default() += 1;
                }
                if let Err(s) = out {
                    assert!(
                        !matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown),
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    );
                    assert!(s.message().len() < 4096, "a {}-byte message", s.message().len());
                }
            }
        },
    )
    .await;
    println!(
        "fuzz generate_requests: answers by code {:?}",
        codes.lock().map(|m| m.clone()).unwrap_or_default()
    );
    Ok(())
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("model".to_owned()),
                    Just("messages".to_owned()),
                    Just("prompt".to_owned()),
                    Just("role".to_owned()),
                    Just("content".to_owned()),
                    Just("max_tokens".to_owned()),
                    Just("stream".to_owned()),
                    Just("stop".to_owned()),
                    Just("ensemble".to_owned()),
                    Just("temperature".to_owned()),
                    ".{0,6}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Valid bodies, to be mutated.
fn seeds() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/chat/completions",
            json!({"model": "ensemble", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "chared", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stream": true, "max_tokens": 4}),
        ),
        (
            "/v1/completions",
            json!({"model": "a", "prompt": ["x", "y"], "stop": ["\n"], "ensemble": {"specfuse": {"segment_tokens": 3}}}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bodies() -> anyhow::Result<()> {
    let c = coordinator().await?;
    let router = coordinator::http::router(c);
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        arb_json().prop_map(|v| v.to_string().into_bytes()),
        (
            0usize..3,
            proptest::collection::vec((any::<u16>(), any::<u8>(), any::<u8>()), 1..4)
        )
            .prop_map(|(i, e)| shared::mutate(seeds()[i].1.to_string().into_bytes(), &e)),
    ];
    let path = prop_oneof![Just("/v1/chat/completions"), Just("/v1/completions")];
    let statuses = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u16, u64>::new(),
    ));
    let seen = statuses.clone();
    soak("http_bodies", (path, body), move |(path, body)| {
        let router = router.clone();
        let seen = seen.clone();
        async move {
            let req = axum::http::Request::post(path)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .unwrap_or_default();
            let resp = tokio::time::timeout(Duration::from_secs(10), router.oneshot(req))
                .await
                .unwrap_or_else(|_| panic!("no answer within 10 s"))
                .unwrap_or_else(|e| match e {});
            let status = resp.status().as_u16();
            assert!(status != 500, "500 for this body");
            if let Ok(mut m) = seen.lock() {
                *m.entry(status).or_default() += 1;
            }
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            if status >= 400 {
                let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                assert!(
                    v["error"]["message"].is_string(),
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    })
    .await;
    println!(
        "fuzz http_bodies: answers by status {:?}",
        statuses.lock().map(|m| m.clone()).unwrap_or_default()
    );
    Ok(())
}
