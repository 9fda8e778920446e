//! The coordinator's HTTP face (axum): an OpenAI-compatible API, Prometheus metrics and a health
//! probe.
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: unary, or streamed as Server-Sent Events
//!   (`"stream": true`, ending with `data: [DONE]`); see [`openai`] for the mapping.
//! - `GET /v1/models`, `GET /v1/models/{id}`: the ensemble, its strategies and each member.
//! - `GET /metrics`: [`crate::metrics::Metrics`] in the Prometheus text format.
//! - `GET /health`: 200 while the process serves, with each member's state (up, or why not).
//! - `GET /ready`: 200 when at least `min_healthy_nodes` members are up, else 503.
//! - `GET /ui`: the live trace page and its two data calls ([`ui`]; `ui = false` turns it off).
//!
//! `/v1` requires a bearer token when API keys are configured ([`crate::auth`]); errors use OpenAI's
//! `{"error": {...}}` shape. With the coordinator's `[tls]` the HTTP face speaks TLS too ([`tls`]). A W3C `traceparent` header makes the request part of the caller's trace.

pub mod openai;
mod stream;
pub mod tls;
mod ui;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ensemble_proto::v1 as pb;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::core::{Coordinator, request_span};
use crate::strategy::Step;
use openai::{ApiError, Common};
use stream::StreamText;

#[derive(Clone)]
struct App {
    coordinator: Arc<Coordinator>,
    next_id: Arc<AtomicU64>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // Overload passes quickly: a second is what a well-behaved client waits before retrying.
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// The router over `coordinator`.
pub fn router(coordinator: Arc<Coordinator>) -> Router {
    let app = App {
        coordinator,
        next_id: Arc::new(AtomicU64::new(0)),
    };
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .fallback(|| async { unknown_url() })
        .layer(axum::middleware::from_fn_with_state(app.clone(), authenticate));
    let body_limit = app.coordinator.settings().input.max_request_bytes;
    let ui = if app.coordinator.settings().ui {
        ui::routes(app.clone())
    } else {
        Router::new()
    };
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(v1)
        .merge(ui)
        .fallback(|| async { unknown_url() })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                kind: "invalid_request_error",
                code: "method_not_allowed",
                param: None,
                message: "method not allowed: /v1/chat/completions and /v1/completions take POST; \
                          /v1/models, /health, /ready and /metrics take GET"
                    .into(),
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

/// A 404 in OpenAI's shape for a path no route serves.
fn unknown_url() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "unknown_url",
        param: None,
        message: "unknown endpoint: see /v1/chat/completions, /v1/completions, /v1/models, /health, \
                  /ready, /metrics"
            .into(),
    }
}

/// Liveness, with each member's state: 200 while the process serves.
async fn health(State(app): State<App>) -> Json<Value> {
    Json(health_body(&app.coordinator))
}

/// Readiness: 200 when at least `min_healthy_nodes` members are up, else 503 (same body as
/// `/health`).
async fn ready(State(app): State<App>) -> Response {
    let status = if app.coordinator.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health_body(&app.coordinator))).into_response()
}

fn health_body(c: &Coordinator) -> Value {
    let members: Vec<Value> = c
        .member_status()
        .into_iter()
        .map(|(name, up)| match up {
            Ok(()) => json!({"name": name, "up": true}),
            Err(why) => json!({"name": name, "up": false, "error": why}),
        })
        .collect();
    let up = members.iter().filter(|m| m["up"] == true).count();
    json!({
        "status": "ok",
        "ready": c.ready(),
        "members_up": up,
        "min_healthy_nodes": c.settings().min_healthy_nodes,
        "members": members,
    })
}

/// Counts every response by route template (bounded: unknown paths are `other`) and status.
async fn count(State(app): State<App>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    app.coordinator
        .metrics()
        .http_request(&route, resp.status().as_u16());
    resp
}

/// Serves [`router`] on `listener` until `shutdown` resolves (in-flight requests then finish).
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|s| ensemble_proto::net::set_nodelay(s));
    axum::serve(listener, router(coordinator))
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`] over TLS with `config` (see [`tls::server_config`]).
pub async fn serve_tls(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    config: tokio_rustls::rustls::ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tls::TlsListener::new(listener, config)?;
    axum::serve(listener, router(coordinator))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn authenticate(State(app): State<App>, req: Request, next: Next) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match app.coordinator.settings().api_keys.check(auth) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            app.coordinator.metrics().auth_failed("http");
            tracing::info!(api = "http", reason = %refusal, "request refused");
            let mut r = ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "authentication_error",
                code: "invalid_api_key",
                param: None,
                message: refusal.to_string(),
            }
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.coordinator.metrics().render(),
    )
}

fn model_card(id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

async fn models(State(app): State<App>) -> Json<Value> {
    let data: Vec<Value> = openai::model_ids(app.coordinator.node_names())
        .iter()
        .map(|(id, owner)| model_card(id, owner))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn model(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    openai::model_ids(app.coordinator.node_names())
        .iter()
        .find(|(m, _)| *m == id)
        .map(|(m, owner)| Json(model_card(m, owner)))
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            param: Some("model"),
            message: format!("model {id:?} does not exist"),
        })
}

/// The body, or the rejection in OpenAI's shape (413 past `max_request_bytes`).
fn body(b: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|r| {
        let status = r.status();
        ApiError {
            status,
            kind: "invalid_request_error",
            code: if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request_too_large"
            } else {
                "invalid_body"
            },
            param: None,
            message: if status == StatusCode::PAYLOAD_TOO_LARGE {
                "the request body is larger than the coordinator's max_request_bytes".into()
            } else {
                format!("the request body could not be read: {}", r.body_text())
            },
        }
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(None, format!("invalid request body: {e}")))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which endpoint: they differ in object names and in where the text goes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

struct Call {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    prompt_chars: usize,
}

async fn chat(
    State(app): State<App>,
    headers: HeaderMap,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (prompt, common) = chat_body(b)?;
    run(app, headers, Kind::Chat, prompt, common).await
}

/// A chat body's prompt and shared fields (`/v1/chat/completions`, the trace page).
fn chat_body(
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(pb::Prompt, Common), ApiError> {
    let r: openai::ChatRequest = parse(&body(b)?)?;
    Ok((openai::chat_prompt(r.messages)?, r.common))
}

async fn completions(
    State(app): State<App>,
    headers: HeaderMap,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let r: openai::CompletionRequest = parse(&body(b)?)?;
    let prompt = openai::completion_prompt(r.prompt)?;
    run(app, headers, Kind::Completion, prompt, r.common).await
}

async fn run(
    app: App,
    headers: HeaderMap,
    kind: Kind,
    prompt: pb::Prompt,
    c: Common,
) -> Result<Response, ApiError> {
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let call = Call {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{}-{n}", std::process::id()),
            Kind::Completion => format!("cmpl-{}-{n}", std::process::id()),
        },
        model: c.model.clone(),
        created: now(),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        prompt_chars: openai::prompt_chars(&prompt),
    };
    let stream = c.stream;
    let coordinator = app.coordinator.clone();
    let (req, span) = prepare(&coordinator, headers, prompt, c)?;
    if stream {
        return Ok(streamed(coordinator, span, call, req).into_response());
    }
    let resp = coordinator.run_in(span, "http", req, &mut |_| true).await?;
    Ok(Json(whole(&call, &resp)).into_response())
}

/// The request an OpenAI body asks for (checked before anything runs, so that a stream fails with a
/// 400 before it starts) and its span, a child of the caller's `traceparent` when there is one.
fn prepare(
    coordinator: &Coordinator,
    headers: HeaderMap,
    prompt: pb::Prompt,
    c: Common,
) -> Result<(pb::GenerateRequest, tracing::Span), ApiError> {
    let req = openai::generate_request(
        prompt,
        c,
        coordinator.node_names(),
        coordinator.settings().max_chars,
    )?;
    let span = request_span("http");
    ensemble_proto::telemetry::set_parent(&span, &tonic::metadata::MetadataMap::from_headers(headers));
    Ok((req, span))
}

fn whole(call: &Call, r: &pb::GenerateResponse) -> Value {
    let finish = openai::finish_reason(r.finish_reason());
    let choice = match call.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": r.text});
            if !r.reasoning.is_empty() {
                message["reasoning_content"] = json!(r.reasoning);
            }
            json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish})
        }
        Kind::Completion => json!({"index": 0, "text": r.text, "logprobs": null, "finish_reason": finish}),
    };
    json!({
        "id": call.id,
        "object": if call.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": call.created,
        "model": call.model,
        "choices": [choice],
        "usage": openai::usage(call.prompt_chars, r.text.chars().count() + r.reasoning.chars().count()),
        "ensemble": openai::ensemble_report(r),
    })
}

impl Call {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// Chunks for released text.
    fn pieces(&self, (reasoning, answer): (String, String)) -> Vec<Value> {
        let mut out = Vec::new();
        match self.kind {
            Kind::Chat => {
                if !reasoning.is_empty() {
                    out.push(self.chunk(json!([{"index": 0, "delta": {"reasoning_content": reasoning}, "finish_reason": null}])));
                }
                if !answer.is_empty() {
                    out.push(
                        self.chunk(
                            json!([{"index": 0, "delta": {"content": answer}, "finish_reason": null}]),
                        ),
                    );
                }
            }
            // A completion's text is the answer; its reasoning comes in the last chunk's report.
            Kind::Completion if !answer.is_empty() => {
                out.push(
                    self.chunk(
                        json!([{"index": 0, "text": answer, "logprobs": null, "finish_reason": null}]),
                    ),
                );
            }
            Kind::Completion => {}
        }
        out
    }

    fn last(&self, r: &pb::GenerateResponse) -> Vec<Value> {
        let finish = openai::finish_reason(r.finish_reason());
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": {}, "finish_reason": finish}),
            Kind::Completion => json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish}),
        };
        let mut last = self.chunk(json!([choice]));
        last["ensemble"] = openai::ensemble_report(r);
        let mut out = vec![last];
        if self.include_usage {
            let mut u = self.chunk(json!([]));
            u["usage"] = openai::usage(
                self.prompt_chars,
                r.text.chars().count() + r.reasoning.chars().count(),
            );
            out.push(u);
        }
        out
    }
}

enum Piece {
    Text(String),
    Done(Result<pb::GenerateResponse, tonic::Status>),
}

/// Runs the request in a task and streams its text as it is accepted. A client that goes away
/// closes the channel: the next step's send fails and the request is cancelled.
fn streamed(
    coordinator: Arc<Coordinator>,
    span: tracing::Span,
    call: Call,
    req: pb::GenerateRequest,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    let mut text = StreamText::new(req.stop.clone(), req.max_chars as usize);
    tokio::spawn(async move {
        let steps = tx.clone();
        let mut on_step = move |s: Step<'_>| match s.delta() {
            Some(d) => steps.send(Piece::Text(d.into_owned())).is_ok(),
            None => !steps.is_closed(),
        };
        let out = coordinator.run_in(span, "http", req, &mut on_step).await;
        let _ = tx.send(Piece::Done(out));
    });
    let mut first = call.kind == Kind::Chat;
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).flat_map(move |piece| {
        let mut out: Vec<Value> = Vec::new();
        if first {
            first = false;
            out.push(call.chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            ));
        }
        let mut done = false;
        match piece {
            Piece::Text(t) => out.extend(call.pieces(text.push(&t))),
            Piece::Done(Ok(r)) => {
                // A strategy without steps (one node alone) streams its whole answer here.
                let rest = if text.is_empty() {
                    (r.reasoning.clone(), r.text.clone())
                } else {
                    text.finish()
                };
                out.extend(call.pieces(rest));
                out.extend(call.last(&r));
                done = true;
            }
            Piece::Done(Err(s)) => {
                out.push(ApiError::from(s).body());
                done = true;
            }
        }
        let mut events: Vec<Result<Event, Infallible>> = out
            .into_iter()
            .map(|v| Ok(Event::default().data(v.to_string())))
            .collect();
        if done {
            events.push(Ok(Event::default().data("[DONE]")));
        }
        futures::stream::iter(events)
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
