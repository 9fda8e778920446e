//! The OpenAI-compatible HTTP API over real HTTP against three real nodes: the same answers as the
//! library, streams that add up to the unary answer, OpenAI-shaped errors, bearer tokens, and
//! `/metrics` counting requests and node RPCs exactly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use coordinator::auth::ApiKeys;
use coordinator::config::{NodeConfig, Settings};
use coordinator::replicas::SystemResolver;
use coordinator::service::Coordinator;
use ensemble_proto::v1 as pb;
use serde_json::{Value, json};

struct Api {
    base: String,
    coordinator: Arc<Coordinator>,
    nodes: Vec<common::Node>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn api(keys: &[&str]) -> anyhow::Result<Api> {
    let nodes = common::three_nodes().await?;
    let names = ["a", "b", "c"];
    let members: Vec<NodeConfig> = nodes
        .iter()
        .zip(names)
        .map(|(n, name)| {
            coordinator::service::NodeSpec {
                name: name.into(),
                url: n.url.clone(),
                weight: 1.0,
            }
            .into()
        })
        .collect();
    let mut settings = Settings::new(members);
    settings.deadline = Duration::from_secs(20);
    settings.api_keys = ApiKeys::new(keys);
    let coordinator = Arc::new(Coordinator::start(settings, Arc::new(SystemResolver)).await?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(coordinator::http::serve(coordinator.clone(), listener, async {
        let _ = rx.await;
    }));
    Ok(Api {
        base,
        coordinator,
        nodes,
        stop: Some(tx),
    })
}

async fn post(api: &Api, path: &str, body: Value, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut r = reqwest::Client::new()
        .post(format!("{}{path}", api.base))
        .json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_owned())
        .collect()
}

fn library_request(prompt: &str, strategy: &str, max_chars: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw(prompt.into())),
        }),
        strategy: strategy.into(),
        max_chars,
        specfuse: Some(pb::SpecFuseOptions {
            segment_tokens: Some(3),
            exit: Some(false),
            ..Default::default()
        }),
        chared: Some(pb::CharEdOptions::default()),
        sampling: Some(pb::Sampling::default()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_match_the_library_and_streams_add_up() -> anyhow::Result<()> {
    let api = api(&[]).await?;
    for strategy in ["specfuse", "chared"] {
        let expected = api
            .coordinator
            .run(library_request("The Tarn", strategy, 24), &mut |_| true)
            .await?;
        let body = json!({
            "model": strategy, "prompt": "The Tarn", "max_tokens": 24,
            "ensemble": {"specfuse": {"segment_tokens": 3, "exit": false}}
        });
        let (status, text) = post(&api, "/v1/completions", body.clone(), None).await?;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text)?;
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], expected.text, "{strategy}");
        assert_eq!(v["ensemble"]["strategy"], strategy);
        assert_eq!(v["ensemble"]["steps"], expected.steps);
        assert_eq!(v["usage"]["completion_tokens"], expected.text.chars().count());

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let (status, text) = post(&api, "/v1/completions", streamed, None).await?;
        assert_eq!(status, 200, "{text}");
        let ev = events(&text);
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = ev[..ev.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e))
            .collect::<Result<_, _>>()?;
        let joined: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(
            joined, expected.text,
            "{strategy}: streamed pieces add up to the answer"
        );
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish.len(), 1, "one chunk ends the choice");
        assert_eq!(
            chunks.last().map(|c| c["usage"]["completion_tokens"].clone()),
            Some(json!(expected.text.chars().count()))
        );
    }

    // Chat: the same answer as the library's conversation request, streamed as deltas.
    let mut lib = library_request("", "specfuse", 20);
    lib.prompt = Some(pb::Prompt {
        kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Where does the Tarn flow?".into(),
            }],
        })),
    });
    let expected = api.coordinator.run(lib, &mut |_| true).await?;
    let body = json!({
        "model": "ensemble", "max_tokens": 20,
        "messages": [{"role": "user", "content": "Where does the Tarn flow?"}],
        "ensemble": {"specfuse": {"segment_tokens": 3, "exit": false}}
    });
    let (status, text) = post(&api, "/v1/chat/completions", body.clone(), None).await?;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], expected.text);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, text) = post(&api, "/v1/chat/completions", streamed, None).await?;
    let ev = events(&text);
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e))
        .collect::<Result<_, _>>()?;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, expected.text);

    // Models: the ensemble, its strategies, each member.
    let models: Value = reqwest::get(format!("{}/v1/models", api.base))
        .await?
        .json()
        .await?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [
            "ensemble", "specfuse", "chared", "colm", "pipeline", "a", "b", "c"
        ]
    );
    let one = reqwest::get(format!("{}/v1/models/b", api.base)).await?;
    assert_eq!(one.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_have_openai_shape_and_metrics_count_exactly() -> anyhow::Result<()> {
    let api = api(&[]).await?;
    let err = |text: &str| -> anyhow::Result<Value> {
        let v: Value = serde_json::from_str(text)?;
        anyhow::ensure!(v["error"]["message"].is_string(), "no error message in {text}");
        Ok(v["error"].clone())
    };
    let (s, t) = post(
        &api,
        "/v1/completions",
        json!({"model": "gpt-4", "prompt": "x"}),
        None,
    )
    .await?;
    assert_eq!((s, err(&t)?["code"].clone()), (404, json!("model_not_found")));
    let (s, t) = post(&api, "/v1/completions", json!({"model": "a"}), None).await?;
    assert_eq!(
        (s, err(&t)?["type"].clone()),
        (400, json!("invalid_request_error"))
    );
    let (s, t) = post(
        &api,
        "/v1/chat/completions",
        json!({"model": "a", "messages": [], "n": 1}),
        None,
    )
    .await?;
    assert_eq!((s, err(&t)?["param"].clone()), (400, json!("messages")));
    let (s, t) = post(
        &api,
        "/v1/completions",
        json!({"model": "ensemble", "prompt": "x", "ensemble": {"specfuse": {"segment": 3}}}),
        None,
    )
    .await?;
    assert_eq!(s, 400);
    assert!(
        err(&t)?["message"].as_str().unwrap_or("").contains("segment"),
        "{t}"
    );
    // A value the coordinator refuses: its gRPC INVALID_ARGUMENT becomes a 400 with its message.
    let body = json!({"model": "ensemble", "prompt": "x", "ensemble": {"specfuse": {"exit_tau": -1.0}}});
    let (s, t) = post(&api, "/v1/completions", body, None).await?;
    assert_eq!(s, 400);
    assert!(err(&t)?["message"].as_str().unwrap_or("").contains("tau"), "{t}");
    // A stream with a bad limit fails before it starts, as a plain 400.
    let body = json!({"model": "ensemble", "prompt": "x", "max_tokens": 0, "stream": true});
    let (s, t) = post(&api, "/v1/completions", body, None).await?;
    assert_eq!((s, err(&t)?["param"].clone()), (400, json!("max_tokens")));

    // Metrics: two SpecFuse requests without exit; every active node proposes once per round.
    let mut rounds = 0.0;
    for prompt in ["The Tarn", "Mount Eld"] {
        let body = json!({"model": "specfuse", "prompt": prompt, "max_tokens": 12,
                          "ensemble": {"specfuse": {"segment_tokens": 2, "exit": false}}});
        let (s, t) = post(&api, "/v1/completions", body, None).await?;
        assert_eq!(s, 200, "{t}");
        let v: Value = serde_json::from_str(&t)?;
        rounds += v["ensemble"]["steps"].as_f64().unwrap_or(0.0);
    }
    let text = reqwest::get(format!("{}/metrics", api.base))
        .await?
        .text()
        .await?;
    let ok = [("strategy", "specfuse"), ("api", "http"), ("code", "OK")];
    assert_eq!(common::sample(&text, "ensemble_requests_total", &ok), Some(2.0));
    assert_eq!(
        common::sample(
            &text,
            "ensemble_requests_total",
            &[("strategy", "specfuse"), ("code", "INVALID_ARGUMENT")]
        ),
        Some(1.0),
        "the exit_tau = -1 request"
    );
    assert_eq!(
        common::sample(&text, "ensemble_requests_in_flight", &[]),
        Some(0.0)
    );
    let http = |route, status| {
        common::sample(
            &text,
            "ensemble_http_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(http("/v1/completions", "404"), Some(1.0), "the unknown model");
    assert_eq!(http("/v1/completions", "200"), Some(2.0));
    assert_eq!(http("/v1/completions", "400"), Some(4.0));
    assert_eq!(http("/v1/chat/completions", "400"), Some(1.0));
    let proposes: f64 = common::samples(&text, "ensemble_node_rpcs_total", &[("rpc", "ProposeSegment")])
        .iter()
        .sum();
    assert_eq!(proposes, 3.0 * rounds, "3 nodes x {rounds} rounds");
    let won: f64 = common::samples(&text, "ensemble_node_rounds_won_total", &[])
        .iter()
        .sum();
    let active: f64 = common::samples(&text, "ensemble_node_rounds_active_total", &[])
        .iter()
        .sum();
    assert_eq!((won, active), (rounds, 3.0 * rounds));
    assert_eq!(
        common::sample(&text, "ensemble_round_duration_seconds_count", &[]),
        Some(rounds)
    );
    assert_eq!(
        common::sample(
            &text,
            "ensemble_time_to_first_token_seconds_count",
            &[("strategy", "specfuse")]
        ),
        Some(2.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_v1_api_needs_a_valid_bearer_token() -> anyhow::Result<()> {
    let api = api(&["key-one", "key-two"]).await?;
    let body = json!({"model": "a", "prompt": "The Tarn", "max_tokens": 4});
    let (s, t) = post(&api, "/v1/completions", body.clone(), None).await?;
    assert_eq!(s, 401, "{t}");
    let v: Value = serde_json::from_str(&t)?;
    assert_eq!(v["error"]["type"], "authentication_error");
    let (s, t) = post(&api, "/v1/completions", body.clone(), Some("key-three")).await?;
    assert_eq!(s, 401, "{t}");
    assert!(!t.contains("key-three"), "the refused token is not echoed: {t}");
    let (s, t) = post(&api, "/v1/completions", body, Some("key-two")).await?;
    assert_eq!(s, 200, "{t}");
    // Probes and scrapers carry no key.
    let health = reqwest::get(format!("{}/health", api.base)).await?;
    assert_eq!(health.status(), 200);
    let text = reqwest::get(format!("{}/metrics", api.base))
        .await?
        .text()
        .await?;
    assert_eq!(
        common::sample(&text, "ensemble_auth_failures_total", &[("api", "http")]),
        Some(2.0)
    );
    assert!(!text.contains("key-"), "no key in the metrics");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_client_goes_away_counts_as_cancelled() -> anyhow::Result<()> {
    let api = api(&[]).await?;
    // The same coordinator behind gRPC: a unary call whose deadline passes mid-request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::ensemble_server::EnsembleServer::new(
                coordinator::service::EnsembleService::shared(api.coordinator.clone()),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = pb::ensemble_client::EnsembleClient::connect(url).await?;
    let mut req = tonic::Request::new(library_request("The Tarn", "chared", 2000));
    req.set_timeout(Duration::from_millis(300));
    assert!(client.generate(req).await.is_err(), "the deadline passes first");
    let mut text = String::new();
    for _ in 0..100 {
        text = reqwest::get(format!("{}/metrics", api.base))
            .await?
            .text()
            .await?;
        if common::sample(&text, "ensemble_requests_in_flight", &[]) == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        common::sample(&text, "ensemble_requests_in_flight", &[]),
        Some(0.0)
    );
    assert_eq!(
        common::sample(
            &text,
            "ensemble_requests_total",
            &[("strategy", "chared"), ("api", "grpc"), ("code", "CANCELLED")]
        ),
        Some(1.0),
        "{text}"
    );
    // The abandoned request's node sessions are freed, not left to eviction.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.clear();
        for n in &api.nodes {
            let mut c = pb::model_node_client::ModelNodeClient::connect(n.url.clone()).await?;
            held.push(c.info(pb::InfoRequest {}).await?.into_inner().active_sessions);
        }
        if held.iter().all(|&h| h == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held, [0, 0, 0], "sessions held after the client went away");
    Ok(())
}
