//! Faults, overload and hostile input against a served coordinator (gRPC and HTTP on real sockets)
//! over three real model nodes: the same bad request gets the same status from every strategy and
//! both faces, before any node works on it; undecodable and oversized requests are the client's
//! fault; overload is RESOURCE_EXHAUSTED / 429 with Retry-After and leaves no session behind;
//! readiness follows the members' health probe.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::config::{NodeConfig, Settings};
use coordinator::replicas::SystemResolver;
use coordinator::service::{Coordinator, NodeSpec};
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::ensemble_client::EnsembleClient;
use serde_json::{Value, json};
use tonic::Code;

struct Served {
    grpc: EnsembleClient<tonic::transport::Channel>,
    channel: tonic::transport::Channel,
    http: String,
    nodes: Vec<common::Node>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Small limits, so that the table's oversized inputs stay small.
fn settings(nodes: &[common::Node]) -> Settings {
    let members: Vec<NodeConfig> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            NodeSpec {
                name: format!("n{i}"),
                url: n.url.clone(),
                weight: 1.0,
            }
            .into()
        })
        .collect();
    let mut s = Settings::new(members);
    s.deadline = Duration::from_secs(20);
    s.input.max_message_bytes = 2000;
    s.input.max_messages = 8;
    s.input.max_prompt_bytes = 5000;
    s.input.max_request_bytes = 64 << 10;
    s.probe_every = Duration::from_millis(100);
    s
}

async fn serve(nodes: Vec<common::Node>, settings: Settings) -> anyhow::Result<Served> {
    let c = Coordinator::start(settings, Arc::new(SystemResolver)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", http.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = coordinator::server::ServeOptions {
        tls: None,
        http: Some(http),
    };
    tokio::spawn(coordinator::server::serve_with(
        c,
        listener,
        async {
            let _ = stopped.await;
        },
        opts,
    ));
    let channel = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
    Ok(Served {
        grpc: EnsembleClient::new(channel.clone()),
        channel,
        http: base,
        nodes,
        _stop: stop,
    })
}

/// Engine calls every node has finished, and the sessions they hold.
async fn node_load(nodes: &[common::Node]) -> anyhow::Result<Vec<(u64, u32)>> {
    let mut out = Vec::new();
    for n in nodes {
        let mut c = pb::model_node_client::ModelNodeClient::connect(n.url.clone()).await?;
        let i = c.info(pb::InfoRequest {}).await?.into_inner();
        out.push((i.calls_done, i.active_sessions));
    }
    Ok(out)
}

fn chat(messages: Vec<(&str, String)>) -> pb::Prompt {
    pb::Prompt {
        kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
            messages: messages
                .into_iter()
                .map(|(role, content)| pb::ChatMessage {
                    role: role.into(),
                    content,
                })
                .collect(),
        })),
    }
}

/// One bad request, as gRPC and as HTTP (`/v1/chat/completions`), and a fragment its message names.
struct Case {
    name: &'static str,
    grpc: Box<dyn Fn(&str) -> pb::GenerateRequest>,
    http: Box<dyn Fn(&str) -> Value>,
    names: &'static str,
}

fn cases() -> Vec<Case> {
    let base = |strategy: &str, prompt: pb::Prompt| pb::GenerateRequest {
        prompt: Some(prompt),
        strategy: strategy.into(),
        max_chars: 16,
        ..Default::default()
    };
    let body = |strategy: &str, messages: Value| {
        json!({"model": "ensemble", "messages": messages, "max_tokens": 16,
               "ensemble": {"strategy": strategy}})
    };
    let user = |text: String| chat(vec![("user", text)]);
    vec![
        Case {
            name: "negative temperature",
            grpc: Box::new(move |s| pb::GenerateRequest {
                sampling: Some(pb::Sampling {
                    temperature: -1.0,
                    ..Default::default()
                }),
                ..base(s, user("hi".into()))
            }),
            http: Box::new(move |s| {
                let mut b = body(s, json!([{"role": "user", "content": "hi"}]));
                b["temperature"] = json!(-1.0);
                b
            }),
            names: "temperature",
        },
        Case {
            name: "top_p 0",
            grpc: Box::new(move |s| pb::GenerateRequest {
                sampling: Some(pb::Sampling {
                    top_p: Some(0.0),
                    ..Default::default()
                }),
                ..base(s, user("hi".into()))
            }),
            http: Box::new(move |s| {
                let mut b = body(s, json!([{"role": "user", "content": "hi"}]));
                b["top_p"] = json!(0.0);
                b
            }),
            names: "top_p",
        },
        Case {
            name: "a message over max_message_bytes",
            grpc: Box::new(move |s| base(s, user("x".repeat(2001)))),
            http: Box::new(move |s| body(s, json!([{"role": "user", "content": "x".repeat(2001)}]))),
            names: "max_message_bytes",
        },
        Case {
            name: "more than max_messages",
            grpc: Box::new(move |s| base(s, chat(vec![("user", "hi".into()); 9]))),
            http: Box::new(move |s| body(s, json!(vec![json!({"role": "user", "content": "hi"}); 9]))),
            names: "max_messages",
        },
        Case {
            name: "a prompt over max_prompt_bytes",
            grpc: Box::new(move |s| base(s, chat(vec![("user", "x".repeat(1900)); 3]))),
            http: Box::new(move |s| {
                body(
                    s,
                    json!(vec![json!({"role": "user", "content": "x".repeat(1900)}); 3]),
                )
            }),
            names: "max_prompt_bytes",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_same_status_everywhere_before_any_node_works() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let s = settings(&nodes);
    let mut api = serve(nodes, s).await?;
    let before = node_load(&api.nodes).await?;
    let http = reqwest::Client::new();
    for case in cases() {
        for strategy in ["specfuse", "chared", "single:n1"] {
            let e = api
                .grpc
                .generate((case.grpc)(strategy))
                .await
                .expect_err(case.name);
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{} / {strategy}: {e:?}",
                case.name
            );
            assert!(e.message().contains(case.names), "{}: {}", case.name, e.message());
            let r = http
                .post(format!("{}/v1/chat/completions", api.http))
                .json(&(case.http)(strategy))
                .send()
                .await?;
            assert_eq!(r.status().as_u16(), 400, "{} / {strategy} over HTTP", case.name);
            let v: Value = r.json().await?;
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(case.names), "{}: {v}", case.name);
        }
    }
    // A long strategy name is quoted back, not echoed whole.
    let long = "z".repeat(50_000);
    let e = api
        .grpc
        .generate(pb::GenerateRequest {
            prompt: Some(chat(vec![("user", "hi".into())])),
            strategy: long.clone(),
            max_chars: 16,
            ..Default::default()
        })
        .await
        .expect_err("unknown strategy");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("unknown strategy"), "{}", e.message());
    assert!(e.message().len() < 300, "{} bytes", e.message().len());
    let r = http
        .post(format!("{}/v1/chat/completions", api.http))
        .json(
            &json!({"model": "ensemble", "messages": [{"role": "user", "content": "hi"}],
                      "ensemble": {"strategy": long}}),
        )
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    let t = r.text().await?;
    assert!(t.contains("unknown strategy") && t.len() < 500, "{t}");
    assert_eq!(
        node_load(&api.nodes).await?,
        before,
        "no node worked on a bad request"
    );

    // Over max_request_bytes: refused before decoding, still the client's fault.
    let big = pb::GenerateRequest {
        prompt: Some(chat(vec![("user", "x".repeat(70 << 10))])),
        max_chars: 16,
        ..Default::default()
    };
    let e = api.grpc.generate(big).await.expect_err("too large");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_request_bytes"), "{}", e.message());
    let r = http
        .post(format!("{}/v1/completions", api.http))
        .json(&json!({"model": "ensemble", "prompt": "x".repeat(70 << 10)}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["code"], json!("request_too_large"), "{v}");
    // An unknown path and a wrong method are answered in OpenAI's shape too.
    let r = http.get(format!("{}/nowhere", api.http)).send().await?;
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["code"], json!("unknown_url"), "{v}");
    let r = http
        .get(format!("{}/v1/chat/completions", api.http))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["code"], json!("method_not_allowed"), "{v}");

    // Undecodable protobuf: a string field that is not UTF-8, and bytes that are no message.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Evil {
        #[prost(bytes = "vec", tag = "2")]
        strategy: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Garbage {
        #[prost(bytes = "vec", tag = "1")]
        prompt: Vec<u8>,
    }
    let mut g = tonic::client::Grpc::new(api.channel.clone());
    g.ready().await?;
    let path = || tonic::codegen::http::uri::PathAndQuery::from_static("/ensemble.v1.Ensemble/Generate");
    let e = g
        .unary::<_, pb::GenerateResponse, _>(
            tonic::Request::new(Evil {
                strategy: vec![0xff, 0xfe, 0x80],
            }),
            path(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("invalid UTF-8");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    g.ready().await?;
    let e = g
        .unary::<_, pb::GenerateResponse, _>(
            tonic::Request::new(Garbage {
                prompt: vec![0xff; 7],
            }),
            path(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("garbage");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_resource_exhausted_with_retry_after_and_leaves_no_session() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let mut s = settings(&nodes);
    s.max_concurrent_requests = 2;
    let api = serve(nodes, s).await?;
    let request = || pb::GenerateRequest {
        prompt: Some(chat(vec![("user", "tell me a story".into())])),
        strategy: "chared".into(),
        max_chars: 120,
        ..Default::default()
    };
    let mut grpc = Vec::new();
    for _ in 0..8 {
        let mut c = api.grpc.clone();
        let r = request();
        grpc.push(tokio::spawn(async move { c.generate(r).await }));
    }
    let mut http = Vec::new();
    for _ in 0..8 {
        let url = format!("{}/v1/chat/completions", api.http);
        http.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({"model": "chared", "max_tokens": 120,
                              "messages": [{"role": "user", "content": "tell me a story"}]}))
                .send()
                .await?;
            let retry = r.headers().get("retry-after").cloned();
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            anyhow::Ok((status, retry, body))
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in grpc {
        match t.await? {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("max_concurrent_requests"), "{}", e.message());
                refused += 1;
            }
        }
    }
    for t in http {
        let (status, retry, body) = t.await??;
        match status {
            200 => ok += 1,
            429 => {
                assert!(retry.is_some(), "429 without Retry-After");
                assert_eq!(body["error"]["type"], json!("rate_limit_error"), "{body}");
                refused += 1;
            }
            s => anyhow::bail!("unexpected status {s}: {body}"),
        }
    }
    assert_eq!(ok + refused, 16);
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    // Every answered request closed its sessions (closes may land just after the answer).
    let t0 = Instant::now();
    loop {
        let load = node_load(&api.nodes).await?;
        if load.iter().all(|l| l.1 == 0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "sessions left: {load:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_members_and_health_names_them() -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let nodes = common::three_nodes().await?;
    let s = settings(&nodes);
    let mut api = serve(nodes, s).await?;
    let mut h = HealthClient::new(api.channel.clone());
    let status = |h: &mut HealthClient<tonic::transport::Channel>, service: &str| {
        let mut h = h.clone();
        let service = service.to_owned();
        async move {
            anyhow::Ok(
                h.check(HealthCheckRequest { service })
                    .await?
                    .into_inner()
                    .status(),
            )
        }
    };
    let wait_for = |want: ServingStatus| {
        let mut h = h.clone();
        async move {
            let t0 = Instant::now();
            loop {
                if status(&mut h, "ensemble.v1.Ensemble").await? == want {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(
                    t0.elapsed() < Duration::from_secs(10),
                    "readiness never became {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(ServingStatus::Serving).await?;
    let r = reqwest::get(format!("{}/ready", api.http)).await?;
    assert_eq!(r.status().as_u16(), 200);
    // Every member stops: readiness turns NOT_SERVING and /ready 503; liveness stays SERVING.
    for n in &mut api.nodes {
        if let Some(stop) = n.stop.take() {
            let _ = stop.send(());
        }
    }
    for n in &mut api.nodes {
        let _ = (&mut n.task).await;
    }
    wait_for(ServingStatus::NotServing).await?;
    assert_eq!(status(&mut h, "").await?, ServingStatus::Serving);
    let r = reqwest::get(format!("{}/ready", api.http)).await?;
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = reqwest::get(format!("{}/health", api.http)).await?.json().await?;
    assert_eq!(v["ready"], json!(false), "{v}");
    let members = v["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 3, "{v}");
    for m in &members {
        assert_eq!(m["up"], json!(false), "{v}");
        assert!(m["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // A request now fails fast as UNAVAILABLE, naming the members.
    let e = api
        .grpc
        .generate(pb::GenerateRequest {
            prompt: Some(chat(vec![("user", "hi".into())])),
            max_chars: 8,
            ..Default::default()
        })
        .await
        .expect_err("every member is down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("n0"), "{}", e.message());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_stream_sends_its_text_as_deltas() -> anyhow::Result<()> {
    let nodes = common::three_nodes().await?;
    let s = settings(&nodes);
    let mut api = serve(nodes, s).await?;
    let mut stream = api
        .grpc
        .generate_stream(pb::GenerateRequest {
            prompt: Some(chat(vec![("user", "tell me a story".into())])),
            strategy: "single:n0".into(),
            max_chars: 300,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut deltas, mut text, mut done) = (0, String::new(), None);
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(pb::generate_event::Event::Delta(d)) => {
                deltas += 1;
                text.push_str(&d);
            }
            Some(pb::generate_event::Event::Done(r)) => done = Some(r),
            _ => {}
        }
    }
    let done = done.ok_or_else(|| anyhow::anyhow!("no final response"))?;
    assert!(!done.text.is_empty());
    assert_eq!(text, done.text, "the deltas add up to the answer");
    assert_eq!(deltas, done.steps, "one delta per segment");
    Ok(())
}
