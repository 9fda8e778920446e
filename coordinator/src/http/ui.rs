//! The live trace page: `GET /ui` shows an answer being written, each span coloured by the member
//! that wrote it, with every round's drafts, scores and exits on hover (the front end is three static
//! files in `coordinator/ui/`, embedded in the binary).
//!
//! - `GET /ui`, `/ui/app.js`, `/ui/style.css`: the page. It holds no data, so it is served without
//!   a token (a browser cannot add a bearer header to a navigation); everything it shows comes from
//!   the two calls below, which follow `/v1`'s bearer-token rule, the key typed into the page.
//! - `GET /ui/api/members`: members (weight, up or why not), the model ids, the default length.
//! - `POST /ui/api/generate`: an OpenAI chat body (with the `ensemble` extension), answered as
//!   Server-Sent Events of JSON objects with an `event` field: `delta`, `round`, `char`, `span`,
//!   `stage` (the gRPC `GenerateStream` trace messages, made by the same [`step_event`] from the same
//!   steps), then `done` or `error`.
//!
//! Served unless the configuration says `ui = false`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::generate_event::Event as Ev;
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::openai::{self, ApiError};
use super::{App, authenticate, chat_body, prepare};
use crate::core::Coordinator;
use crate::strategy::Step;

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/style.css");

/// The page's routes (the data calls behind the bearer-token rule).
pub(super) fn routes(app: App) -> Router<App> {
    let api = Router::new()
        .route("/ui/api/members", get(members))
        .route("/ui/api/generate", post(generate))
        .layer(axum::middleware::from_fn_with_state(app, authenticate));
    Router::new()
        .route("/ui", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .merge(api)
}

/// A static file, with headers that keep the page to its own origin.
fn asset(content_type: &'static str, text: &'static str) -> Response {
    let mut r = text.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn members(State(app): State<App>) -> Json<Value> {
    let c = &app.coordinator;
    let status = c.member_status();
    let members: Vec<Value> = c
        .member_configs()
        .map(|(spec, _)| {
            let up = status
                .iter()
                .find(|(n, _)| *n == spec.name)
                .map(|(_, u)| u.clone());
            let (up, error) = match up {
                Some(Ok(())) => (true, String::new()),
                Some(Err(why)) => (false, why),
                None => (false, "unknown".to_owned()),
            };
            json!({"name": spec.name, "weight": spec.weight, "up": up, "error": error})
        })
        .collect();
    let strategies: Vec<String> = openai::model_ids(c.node_names())
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    Json(json!({
        "members": members,
        "strategies": strategies,
        "default_strategy": c.settings().default_strategy,
        "default_max_chars": c.settings().max_chars,
    }))
}

/// A trace message as the page's JSON: its fields, plus `event`.
fn tagged<T: serde::Serialize>(kind: &str, m: &T) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("event".into(), json!(kind));
    }
    v
}

/// One step as the page's events: the text it appended, then its trace (the gRPC stream's message).
pub(super) fn step_event(s: Step<'_>, names: &[String]) -> Vec<Value> {
    let mut out = Vec::with_capacity(2);
    if let Some(d) = s.delta().filter(|d| !d.is_empty()) {
        out.push(json!({"event": "delta", "text": d}));
    }
    out.push(match crate::service::step_trace(s, names) {
        Ev::Round(r) => tagged("round", &r),
        Ev::Char(c) => tagged("char", &c),
        Ev::Span(sp) => tagged("span", &sp),
        Ev::Stage(st) => tagged("stage", &st),
        // A step's trace is one of the four above.
        Ev::Delta(_) | Ev::Done(_) => json!({"event": "other"}),
    });
    out
}

/// The last event of an answer.
fn done_event(r: &pb::GenerateResponse, elapsed_ms: f64) -> Value {
    json!({
        "event": "done",
        "text": r.text,
        "reasoning": r.reasoning,
        "finish": openai::finish_reason(r.finish_reason()),
        "strategy": r.strategy,
        "steps": r.steps,
        "mean_active_nodes": r.mean_active_nodes,
        "exited_nodes": r.exited_nodes,
        "failed_nodes": r.failed_nodes,
        "round_trips": r.round_trips,
        "node_calls": r.node_calls,
        "deferrals": r.deferrals,
        "elapsed_ms": elapsed_ms,
    })
}

async fn generate(
    State(app): State<App>,
    headers: HeaderMap,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (prompt, common) = chat_body(b)?;
    let coordinator: Arc<Coordinator> = app.coordinator.clone();
    let (req, span) = prepare(&coordinator, headers, prompt, common)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let started = Instant::now();
        let names = coordinator.node_names().to_vec();
        let steps = tx.clone();
        // A closed channel (the page went away) cancels the request at the next step.
        let mut on_step = move |s: Step<'_>| step_event(s, &names).into_iter().all(|e| steps.send(e).is_ok());
        let out = coordinator.run_in(span, "http", req, &mut on_step).await;
        let last = match out {
            Ok(r) => done_event(&r, started.elapsed().as_secs_f64() * 1e3),
            Err(s) => {
                let e = ApiError::from(s);
                json!({"event": "error", "status": e.status.as_u16(), "code": e.code, "message": e.message})
            }
        };
        let _ = tx.send(last);
    });
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}
