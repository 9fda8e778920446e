//! The OpenAI wire format: request bodies, their translation to a [`pb::GenerateRequest`], response
//! bodies and stream chunks, and errors in OpenAI's shape.
//!
//! Models: `ensemble` (the default strategy), every registered strategy (`specfuse`, `chared`,
//! `colm`, `pipeline`), and each member by name (that node alone). The ensemble's own options travel in the `ensemble` extension field of the body
//! (`extra_body={"ensemble": {...}}` with the `openai` Python client). Lengths are characters:
//! the members tokenize differently, so `max_tokens` bounds characters and `usage` counts them.

use axum::http::StatusCode;
use ensemble_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The `ensemble` extension: options with no OpenAI equivalent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Extension {
    /// A strategy (`specfuse`, `chared`, `colm`, `pipeline`, `single:NAME`); overrides what `model`
    /// implies.
    pub strategy: Option<String>,
    /// Most characters in the answer (overrides `max_tokens`).
    pub max_chars: Option<u32>,
    /// SpecFuse options (as in the gRPC `SpecFuseOptions`).
    pub specfuse: Option<pb::SpecFuseOptions>,
    /// CharED options (as in the gRPC `CharEdOptions`).
    pub chared: Option<pb::CharEdOptions>,
    /// Co-LLM options (as in the gRPC `CoLlmOptions`).
    pub colm: Option<pb::CoLlmOptions>,
    /// FSLM pipeline options (as in the gRPC `PipelineOptions`).
    pub pipeline: Option<pb::PipelineOptions>,
    /// RTD: λ for the members that serve a reference store (as in the gRPC request).
    pub rtd_lambda: Option<f64>,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    /// `ensemble`, a strategy (`specfuse`, `chared`, `colm`, `pipeline`) or a member's name.
    pub model: String,
    /// Answer length, in characters.
    pub max_tokens: Option<u32>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Stream with Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}`: a last chunk carries the usage.
    pub stream_options: Option<StreamOptions>,
    /// Choices; only 1 is supported.
    pub n: Option<u32>,
    /// The ensemble's options.
    #[serde(default)]
    pub ensemble: Extension,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Whether a final chunk carries `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt (one string, or a list of exactly one).
    pub prompt: OneOrMany,
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message; `content` is a string or a list of text parts.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (`developer` is read as `system`).
    pub role: String,
    /// The text.
    #[serde(default)]
    pub content: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
}

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: &'static str,
    /// The parameter at fault, when known.
    pub param: Option<&'static str>,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_value",
            param,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_value")
            }
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", "permission_denied"),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "overloaded"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", "deadline_exceeded"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "unavailable"),
            Code::Cancelled => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "cancelled",
                "cancelled",
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal"),
        };
        Self {
            status,
            kind,
            code,
            param: None,
            message: s.message().to_owned(),
        }
    }
}

/// The models the API serves: the strategies, then the members.
pub fn model_ids(nodes: &[String]) -> Vec<(String, &'static str)> {
    let mut v: Vec<(String, &'static str)> = std::iter::once("ensemble")
        .chain(plain_strategies())
        .map(|s| (s.to_owned(), "ensemble"))
        .collect();
    v.extend(nodes.iter().map(|n| (n.clone(), "node")));
    v
}

/// The registered strategies a model id can name (families such as `single:` are the members).
fn plain_strategies() -> impl Iterator<Item = &'static str> {
    crate::strategy::registry()
        .iter()
        .map(|s| s.name())
        .filter(|n| !n.ends_with(':'))
}

/// The strategy `model` names (an explicit `ensemble.strategy` wins); `""` is the default one.
fn strategy_for(model: &str, ext: &Extension, nodes: &[String]) -> Result<String, ApiError> {
    if let Some(s) = &ext.strategy {
        if !crate::service::is_strategy(s, nodes) {
            return Err(ApiError::invalid(
                Some("ensemble.strategy"),
                format!(
                    "unknown strategy {}: use one of {} with NAME one of {}",
                    ensemble_proto::limits::quote(s),
                    crate::strategy::names().join(", "),
                    nodes.join(", ")
                ),
            ));
        }
        return Ok(s.clone());
    }
    match model {
        "ensemble" => Ok(String::new()),
        m if plain_strategies().any(|s| s == m) => Ok(model.to_owned()),
        m if nodes.iter().any(|n| n == m) => Ok(format!("single:{m}")),
        m => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            param: Some("model"),
            message: format!(
                "model {} does not exist: use \"ensemble\", a strategy ({}) or a member ({})",
                ensemble_proto::limits::quote(m),
                plain_strategies().collect::<Vec<_>>().join(", "),
                nodes.join(", ")
            ),
        }),
    }
}

fn text_of(content: Option<Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            Some("messages"),
            "message content must be a string or a list of text parts",
        )),
    }
}

/// The prompt of a chat request.
pub fn chat_prompt(messages: Vec<ChatMessage>) -> Result<pb::Prompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages must not be empty"));
    }
    let messages = messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "developer" | "system" => "system",
                "user" => "user",
                "assistant" => "assistant",
                r => {
                    return Err(ApiError::invalid(
                        Some("messages"),
                        format!("message role {r:?} is not supported: use system, user or assistant"),
                    ));
                }
            };
            Ok(pb::ChatMessage {
                role: role.into(),
                content: text_of(m.content)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pb::Prompt {
        kind: Some(pb::prompt::Kind::Conversation(pb::Conversation { messages })),
    })
}

/// The prompt of a completion request.
pub fn completion_prompt(p: OneOrMany) -> Result<pb::Prompt, ApiError> {
    let mut v = p.into_vec();
    if v.len() != 1 {
        return Err(ApiError::invalid(
            Some("prompt"),
            "exactly one prompt per request is supported",
        ));
    }
    Ok(pb::Prompt {
        kind: Some(pb::prompt::Kind::Raw(v.remove(0))),
    })
}

/// The gRPC request for `prompt` with the shared fields.
pub fn generate_request(
    prompt: pb::Prompt,
    c: Common,
    nodes: &[String],
    default_max_chars: u32,
) -> Result<pb::GenerateRequest, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    let strategy = strategy_for(&c.model, &c.ensemble, nodes)?;
    let max_chars = c
        .ensemble
        .max_chars
        .or(c.max_completion_tokens)
        .or(c.max_tokens)
        .unwrap_or(default_max_chars);
    // Checked before the coordinator runs, so that a stream fails with a 400 before it starts.
    let stop = c.stop.map(OneOrMany::into_vec).unwrap_or_default();
    crate::service::check_limits(max_chars, &stop).map_err(|(field, msg)| {
        let param = if field == "max_chars" {
            "max_tokens"
        } else {
            "stop"
        };
        ApiError::invalid(Some(param), msg)
    })?;
    if let Some(t) = c.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be in [0, 2], got {t}"),
        ));
    }
    let sampling = pb::Sampling {
        temperature: c.temperature.unwrap_or(0.0) as f32,
        top_p: c.top_p.map(|p| p as f32),
        top_k: None,
        seed: c.seed,
    };
    crate::service::check_sampling(&sampling).map_err(|(field, msg)| ApiError::invalid(Some(field), msg))?;
    // CharED samples in the coordinator: the OpenAI sampling fields fill what its options leave unset.
    let mut chared = c.ensemble.chared.unwrap_or_default();
    chared.temperature = chared.temperature.or(c.temperature);
    chared.top_p = chared.top_p.or(c.top_p);
    chared.seed = chared.seed.or(c.seed);
    Ok(pb::GenerateRequest {
        prompt: Some(prompt),
        strategy,
        max_chars,
        stop,
        specfuse: c.ensemble.specfuse,
        chared: Some(chared),
        sampling: Some(sampling),
        colm: c.ensemble.colm,
        rtd_lambda: c.ensemble.rtd_lambda,
        pipeline: c.ensemble.pipeline,
    })
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(f: pb::FinishReason) -> &'static str {
    match f {
        pb::FinishReason::Length => "length",
        _ => "stop",
    }
}

/// `usage`, in characters.
pub fn usage(prompt_chars: usize, completion_chars: usize) -> Value {
    json!({
        "prompt_tokens": prompt_chars,
        "completion_tokens": completion_chars,
        "total_tokens": prompt_chars + completion_chars,
    })
}

/// The `ensemble` field of a response: how the answer was made.
pub fn ensemble_report(r: &pb::GenerateResponse) -> Value {
    json!({
        "strategy": r.strategy,
        "steps": r.steps,
        "mean_active_nodes": r.mean_active_nodes,
        "exited_nodes": r.exited_nodes,
        "failed_nodes": r.failed_nodes,
        "reasoning": r.reasoning,
        "round_trips": r.round_trips,
        "node_calls": r.node_calls,
        "deferrals": r.deferrals,
        "spans": r.spans.iter().map(|s| json!({
            "node": s.node, "text": s.text, "deferred": s.deferred, "defer_prob": s.defer_prob,
        })).collect::<Vec<_>>(),
        "stages": r.stages.iter().map(|s| json!({
            "stage": s.stage, "name": s.name, "node": s.node, "prompt": s.prompt, "text": s.text,
            "fallback": s.fallback,
        })).collect::<Vec<_>>(),
    })
}

/// Characters of a prompt (for `usage`).
pub fn prompt_chars(p: &pb::Prompt) -> usize {
    match &p.kind {
        Some(pb::prompt::Kind::Raw(s)) => s.chars().count(),
        Some(pb::prompt::Kind::Conversation(c)) => c.messages.iter().map(|m| m.content.chars().count()).sum(),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> Common {
        serde_json::from_value(v).expect("valid body")
    }

    #[test]
    fn models_map_to_strategies_and_extension_options_pass_through() {
        let nodes = vec!["arith".to_owned(), "atlas".to_owned()];
        let p = completion_prompt(OneOrMany::One("x".into())).expect("one prompt");
        let r = generate_request(
            p.clone(),
            common(json!({"model": "atlas", "max_tokens": 7})),
            &nodes,
            256,
        )
        .expect("valid");
        assert_eq!((r.strategy.as_str(), r.max_chars), ("single:atlas", 7));
        let r = generate_request(
            p.clone(),
            common(
                json!({"model": "ensemble", "stop": "\n", "temperature": 0.5, "seed": 3,
                "ensemble": {"strategy": "chared", "max_chars": 9, "chared": {"top_p": 0.9},
                             "specfuse": {"segment_tokens": 4, "exit": false}}}),
            ),
            &nodes,
            256,
        )
        .expect("valid");
        assert_eq!(
            (r.strategy.as_str(), r.max_chars, r.stop.clone()),
            ("chared", 9, vec!["\n".to_owned()])
        );
        let ch = r.chared.expect("chared options");
        assert_eq!(
            (ch.temperature, ch.top_p, ch.seed),
            (Some(0.5), Some(0.9), Some(3))
        );
        let sf = r.specfuse.expect("specfuse options");
        assert_eq!((sf.segment_tokens, sf.exit), (Some(4), Some(false)));
        let r =
            generate_request(p.clone(), common(json!({"model": "ensemble"})), &nodes, 256).expect("valid");
        assert_eq!((r.strategy.as_str(), r.max_chars), ("", 256));

        let e =
            generate_request(p.clone(), common(json!({"model": "gpt-4"})), &nodes, 256).expect_err("unknown");
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, "model_not_found"));
        let e = generate_request(
            p.clone(),
            common(json!({"model": "ensemble", "n": 2})),
            &nodes,
            256,
        )
        .expect_err("n");
        assert_eq!(e.param, Some("n"));
        assert!(serde_json::from_value::<Common>(json!({"model": "x", "ensemble": {"segment": 1}})).is_err());
        let refused = |body: Value| {
            generate_request(p.clone(), common(body), &nodes, 256)
                .expect_err("refused")
                .param
        };
        assert_eq!(
            refused(json!({"model": "ensemble", "max_tokens": 0})),
            Some("max_tokens")
        );
        assert_eq!(refused(json!({"model": "ensemble", "stop": [""]})), Some("stop"));
        assert_eq!(
            refused(json!({"model": "ensemble", "ensemble": {"strategy": "single:gpt"}})),
            Some("ensemble.strategy")
        );
        assert!(completion_prompt(OneOrMany::Many(vec![])).is_err());
    }

    #[test]
    fn chat_content_parts_and_roles() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}
        ]))
        .expect("messages");
        let Some(pb::prompt::Kind::Conversation(c)) = chat_prompt(msgs).expect("valid").kind else {
            panic!("a conversation")
        };
        assert_eq!(c.messages[0].role, "system");
        assert_eq!(c.messages[1].content, "What is 2+2?");
        let bad: Vec<ChatMessage> =
            serde_json::from_value(json!([{"role": "tool", "content": "x"}])).expect("msgs");
        assert_eq!(chat_prompt(bad).expect_err("role").param, Some("messages"));
    }

    #[test]
    fn grpc_codes_map_to_openai_errors() {
        let e = ApiError::from(tonic::Status::unavailable("every node failed"));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body()["error"]["message"], "every node failed");
        assert_eq!(
            ApiError::from(tonic::Status::invalid_argument("x")).status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ApiError::from(tonic::Status::deadline_exceeded("x")).status,
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
