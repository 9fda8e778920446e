//! The live trace page's HTTP side over real HTTP against three real nodes: the page and its assets
//! (served without a token, with a content security policy), the data calls behind the bearer
//! token, and the answer's event stream equal to the library's trace of the same request (the gRPC
//! stream's messages), step for step. The page itself is checked in Chromium by `tests/ui/check.sh`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use coordinator::auth::ApiKeys;
use coordinator::config::Settings;
use coordinator::replicas::SystemResolver;
use coordinator::service::Coordinator;
use ensemble_proto::v1 as pb;
use serde_json::{Value, json};

const KEY: &str = "ui-test-key";

struct Served {
    base: String,
    coordinator: Arc<Coordinator>,
    _nodes: Vec<common::Node>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(ui: bool) -> anyhow::Result<Served> {
    let nodes = common::three_nodes().await?;
    let members = common::members(&nodes, &["a", "b", "c"]);
    let mut settings = Settings::new(members);
    settings.deadline = Duration::from_secs(20);
    settings.api_keys = ApiKeys::new([KEY]);
    settings.ui = ui;
    let coordinator = Arc::new(Coordinator::start(settings, Arc::new(SystemResolver)).await?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(coordinator::http::serve(coordinator.clone(), listener, async {
        let _ = rx.await;
    }));
    Ok(Served {
        base,
        coordinator,
        _nodes: nodes,
        _stop: tx,
    })
}

fn request(strategy: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "The Tarn".into(),
                }],
            })),
        }),
        strategy: strategy.into(),
        max_chars: 24,
        specfuse: Some(pb::SpecFuseOptions {
            segment_tokens: Some(3),
            ..Default::default()
        }),
        chared: Some(pb::CharEdOptions {
            temperature: Some(0.0),
            ..Default::default()
        }),
        sampling: Some(pb::Sampling::default()),
        ..Default::default()
    }
}

/// Equal JSON, numbers to 1e-12 relative (serde_json's default float parsing may differ from the
/// printed value in the last bit).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_streams_the_same_trace_as_the_library() -> anyhow::Result<()> {
    let s = serve(true).await?;
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let r = http.get(format!("{}{path}", s.base)).send().await?;
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str()?.to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(r.headers().contains_key("content-security-policy"), "{path}");
    }
    let page = http.get(format!("{}/ui", s.base)).send().await?.text().await?;
    assert!(page.contains("app.js") && page.contains("<title>"), "{page}");

    // The data calls follow /v1's bearer-token rule.
    let r = http.get(format!("{}/ui/api/members", s.base)).send().await?;
    assert_eq!(r.status(), 401);
    let m: Value = http
        .get(format!("{}/ui/api/members", s.base))
        .bearer_auth(KEY)
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = m["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(m["members"][0]["weight"], 1.0);
    assert!(
        m["strategies"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("chared")))
    );

    for strategy in ["specfuse", "chared"] {
        // The library's trace of the same request, as the gRPC stream carries it.
        let names = s.coordinator.node_names().to_vec();
        let mut want: Vec<Value> = Vec::new();
        let done = s
            .coordinator
            .run(request(strategy), &mut |step| {
                let ev = coordinator::service::step_trace(step, &names);
                want.push(match ev {
                    pb::generate_event::Event::Round(r) => serde_json::to_value(r).unwrap_or_default(),
                    pb::generate_event::Event::Char(c) => serde_json::to_value(c).unwrap_or_default(),
                    _ => Value::Null,
                });
                true
            })
            .await?;
        let body = json!({
            "model": strategy, "messages": [{"role": "user", "content": "The Tarn"}], "max_tokens": 24,
            "temperature": 0, "ensemble": {"specfuse": {"segment_tokens": 3}}
        });
        let r = http
            .post(format!("{}/ui/api/generate", s.base))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()?
                .starts_with("text/event-stream")
        );
        let text = r.text().await?;
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| serde_json::from_str(d.trim()))
            .collect::<Result<_, _>>()?;
        let kind = if strategy == "specfuse" { "round" } else { "char" };
        let got: Vec<Value> = events
            .iter()
            .filter(|e| e["event"] == kind)
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().map(|o| o.remove("event"));
                e
            })
            .collect();
        assert!(!got.is_empty(), "{strategy}: no {kind} events in {text}");
        assert_eq!(got.len(), want.len(), "{strategy}: steps");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                same(g, w),
                "{strategy} step {i}: the page's trace differs from the library's\n{g}\n{w}"
            );
        }
        let last = events.last().cloned().unwrap_or_default();
        assert_eq!(last["event"], "done", "{text}");
        assert_eq!(last["text"], done.text);
        assert_eq!(last["steps"], done.steps);
        assert_eq!(last["node_calls"], done.node_calls);
        let deltas: String = events
            .iter()
            .filter(|e| e["event"] == "delta")
            .filter_map(|e| e["text"].as_str())
            .collect();
        assert!(deltas.starts_with(&done.text), "{deltas:?} / {:?}", done.text);
    }

    // A client's mistake is refused before any event, in OpenAI's shape: an unknown model is a
    // 404 as on /v1, a bad length a 400.
    for (body, status, says) in [
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "nope",
        ),
        (
            json!({"model": "specfuse", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "max",
        ),
    ] {
        let r = http
            .post(format!("{}/ui/api/generate", s.base))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await?;
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await?;
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| m.contains(says)),
            "{v}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_can_be_turned_off() -> anyhow::Result<()> {
    let s = serve(false).await?;
    let r = reqwest::get(format!("{}/ui", s.base)).await?;
    assert_eq!(r.status(), 404);
    Ok(())
}
