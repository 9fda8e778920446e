//! FSLM (Liang): a pipeline of members, each with a role prompt. Stage k's prompt is its template
//! filled in with the original request and the earlier stages' outputs; the last stage's output is
//! the answer; every stage's prompt and output is in the trace and the response.
//!
//! A stage can be **routed**: patterns searched in the previous stage's output pick the member that
//! runs it (the bundled demo: the generalist drafts, and the form of its draft picks the specialist
//! that answers). A stage whose member fails fails the request with the member's error, or runs on
//! the configured fallback member.
//!
//! Each stage runs in a `stage` tracing span (its index, name, member, whether it is the fallback)
//! that parents the member's node calls.
//!
//! The stages are `[pipeline]` in the configuration, or the request's `PipelineOptions`; both are
//! checked before any node is called ([`Pipeline::plan`](Strategy::plan)).

use std::collections::BTreeMap;

use ensemble_proto::v1 as pb;
use futures::future::BoxFuture;
use serde::Deserialize;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::strategy::single::single;
use crate::strategy::{
    Answer, Ctx, Finish, Limits, Request, Run, SpanStep, StageStep, Step, Strategy, close_all,
};

/// Most stages in a pipeline.
pub const MAX_STAGES: usize = 16;

/// An intermediate stage's output length when its `max_chars` is unset.
pub const DEFAULT_STAGE_CHARS: u32 = 256;

/// `[pipeline]`: the default stages and fallback member.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineParams {
    /// The stages, in order (`[[pipeline.stages]]`, fields as in the gRPC `PipelineStage`).
    pub stages: Vec<pb::PipelineStage>,
    /// A member that runs any stage whose own member fails (a stage's `fallback` wins). Default none.
    pub fallback: Option<String>,
}

/// `pipeline`.
pub struct Pipeline;

/// A checked stage.
#[derive(Debug, Clone)]
struct Stage {
    name: String,
    node: usize,
    template: String,
    max_chars: u32,
    fallback: Option<usize>,
    routes: Vec<(regex::Regex, usize)>,
}

impl Strategy for Pipeline {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    fn plan(&self, r: &Request<'_>) -> Result<Box<dyn Run>> {
        let given = r
            .request
            .pipeline
            .as_ref()
            .map(|p| p.stages.clone())
            .unwrap_or_default();
        let from_request = !given.is_empty();
        let stages = if from_request {
            given
        } else {
            r.settings.pipeline.stages.clone()
        };
        let field = |i: usize, f: &str| format!("pipeline.stages[{i}].{f}");
        if stages.is_empty() {
            return Err(Error::bad_field(
                "pipeline.stages",
                "no stages: give them in the request or configure [[pipeline.stages]]",
            ));
        }
        if stages.len() > MAX_STAGES {
            return Err(Error::bad_field(
                "pipeline.stages",
                format!("at most {MAX_STAGES} stages, got {}", stages.len()),
            ));
        }
        let default_fallback = match &r.settings.pipeline.fallback {
            Some(f) => Some(r.member("pipeline.fallback", f)?),
            None => None,
        };
        let mut checked: Vec<Stage> = Vec::with_capacity(stages.len());
        for (i, s) in stages.iter().enumerate() {
            let node = r.member(&field(i, "node"), &s.node)?;
            if s.template.trim().is_empty() {
                return Err(Error::bad_field(
                    field(i, "template"),
                    "empty: a stage needs a role prompt",
                ));
            }
            minijinja::Environment::new()
                .template_from_str(&s.template)
                .map_err(|e| Error::bad_field(field(i, "template"), format!("not a valid template: {e}")))?;
            if s.max_chars > crate::core::MAX_CHARS {
                return Err(Error::bad_field(
                    field(i, "max_chars"),
                    format!("must be in 1..={}, got {}", crate::core::MAX_CHARS, s.max_chars),
                ));
            }
            let fallback = match s.fallback.as_str() {
                "" => default_fallback,
                f => Some(r.member(&field(i, "fallback"), f)?),
            };
            let mut routes = Vec::with_capacity(s.route.len());
            for (j, rt) in s.route.iter().enumerate() {
                let f = format!("pipeline.stages[{i}].route[{j}]");
                let target = r.member(&format!("{f}.node"), &rt.node)?;
                if i == 0 {
                    return Err(Error::bad_field(
                        f,
                        "the first stage has no previous output to route on",
                    ));
                }
                let re = regex::RegexBuilder::new(&rt.pattern)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| {
                        Error::bad_field(format!("{f}.pattern"), format!("not a valid pattern: {e}"))
                    })?;
                routes.push((re, target));
            }
            let name = if s.name.is_empty() {
                format!("stage-{i}")
            } else {
                s.name.clone()
            };
            if checked.iter().any(|c| c.name == name) {
                return Err(Error::bad_field(
                    field(i, "name"),
                    format!("{name:?} names two stages"),
                ));
            }
            checked.push(Stage {
                name,
                node,
                template: s.template.clone(),
                max_chars: if s.max_chars == 0 {
                    DEFAULT_STAGE_CHARS
                } else {
                    s.max_chars
                },
                fallback,
                routes,
            });
        }
        Ok(Box::new(PipelineRun {
            stages: checked,
            request: request_text(r.request.prompt.as_ref()),
            sampling: r.sampling(),
        }))
    }
}

/// What `{{ request }}` stands for: the last user message, or the raw prompt.
fn request_text(p: Option<&pb::Prompt>) -> String {
    match p.and_then(|p| p.kind.as_ref()) {
        Some(pb::prompt::Kind::Raw(s)) => s.clone(),
        Some(pb::prompt::Kind::Conversation(c)) => c
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .or(c.messages.last())
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        None => String::new(),
    }
}

/// Stage `template` filled in.
fn render(
    template: &str,
    request: &str,
    previous: &str,
    stages: &BTreeMap<String, String>,
) -> Result<String> {
    let env = minijinja::Environment::new();
    env.render_str(
        template,
        minijinja::context! { request => request, previous => previous, stages => stages },
    )
    .map_err(|e| Error::bad_field("pipeline.stages.template", format!("cannot be filled in: {e}")))
}

/// The member a stage runs on after `previous`.
fn route(stage: &Stage, previous: &str) -> usize {
    stage
        .routes
        .iter()
        .find(|(re, _)| re.is_match(previous))
        .map_or(stage.node, |(_, n)| *n)
}

struct PipelineRun {
    stages: Vec<Stage>,
    request: String,
    sampling: pb::Sampling,
}

impl Run for PipelineRun {
    fn run<'a>(self: Box<Self>, ctx: Ctx<'a>) -> BoxFuture<'a, Result<Answer>> {
        Box::pin(async move {
            let Ctx {
                nodes,
                limits,
                observe,
            } = ctx;
            let session = nodes.first().map(|n| n.session().to_owned()).unwrap_or_default();
            let mut outputs: BTreeMap<String, String> = BTreeMap::new();
            let mut previous = String::new();
            let mut done: Vec<StageStep> = Vec::new();
            let mut failed = Vec::new();
            let mut round_trips = 0u64;
            let last = self.stages.len() - 1;
            let out: Result<(String, Finish)> = async {
                let mut answer = (String::new(), Finish::Eos);
                for (k, stage) in self.stages.iter().enumerate() {
                    let prompt_text = render(&stage.template, &self.request, &previous, &outputs)?;
                    let prompt = pb::Prompt {
                        kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                            messages: vec![pb::ChatMessage {
                                role: "user".into(),
                                content: prompt_text.clone(),
                            }],
                        })),
                    };
                    let own = route(stage, &previous);
                    let stage_limits = if k == last {
                        limits.clone()
                    } else {
                        Limits {
                            max_chars: stage.max_chars as usize,
                            stop: vec![],
                        }
                    };
                    let mut tries = vec![(own, false)];
                    if let Some(f) = stage.fallback.filter(|&f| f != own) {
                        tries.push((f, true));
                    }
                    let mut result = None;
                    for (node, fallback) in tries {
                        nodes[node].begin(format!("{session}-stage{k}"), prompt.clone());
                        let mut spans = |o: &crate::strategy::specfuse::RoundOutcome| {
                            k != last
                                || observe(Step::Span(&SpanStep {
                                    node,
                                    text: o.winner.text.clone(),
                                    deferred: false,
                                    defer_prob: 0.0,
                                    defer_probs: vec![],
                                }))
                        };
                        let span = tracing::info_span!(
                            "stage",
                            stage = k as i64,
                            name = %stage.name,
                            node = node as i64,
                            fallback
                        );
                        let ran = single(&mut nodes[node], node, &stage_limits, self.sampling, &mut spans)
                            .instrument(span)
                            .await;
                        match ran {
                            Ok(a) => {
                                round_trips += u64::from(a.steps);
                                result = Some((node, fallback, a));
                                break;
                            }
                            Err(Error::Cancelled) => return Err(Error::Cancelled),
                            Err(e) => {
                                nodes[node].close().await;
                                failed.push((node, e));
                            }
                        }
                    }
                    let Some((node, fallback, a)) = result else {
                        return Err(stage_failed(&stage.name, &failed));
                    };
                    let step = StageStep {
                        stage: k,
                        name: stage.name.clone(),
                        node,
                        prompt: prompt_text,
                        text: a.text.clone(),
                        fallback,
                    };
                    if !observe(Step::Stage(&step)) {
                        return Err(Error::Cancelled);
                    }
                    done.push(step);
                    outputs.insert(stage.name.clone(), a.text.clone());
                    previous = a.text.clone();
                    answer = (a.text, a.finish);
                }
                Ok(answer)
            }
            .await;
            close_all(nodes).await;
            let (text, finish) = out?;
            Ok(Answer {
                steps: done.len() as u32,
                failed,
                round_trips,
                stages: done,
                ..Answer::new(text, finish)
            })
        })
    }
}

/// The error of a stage no member could run: the member's own refusal when it is the client's to fix,
/// else `UNAVAILABLE` naming the stage and every cause.
fn stage_failed(stage: &str, failed: &[(usize, Error)]) -> Error {
    let client = failed.iter().rev().find_map(|(_, e)| match e {
        Error::Node {
            code: tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted,
            ..
        } => Some(e.clone()),
        _ => None,
    });
    if let Some(e) = client {
        return e;
    }
    Error::NodesFailed {
        reason: format!("pipeline stage {stage:?} failed"),
        causes: failed
            .iter()
            .map(|(_, e)| e.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_see_the_request_the_previous_output_and_named_stages() {
        let mut stages = BTreeMap::new();
        stages.insert("draft".to_owned(), "405".to_owned());
        let t = "Q: {{ request }} | prev: {{ previous }} | draft: {{ stages.draft }}";
        assert_eq!(
            render(t, "What is 347 + 58?", "x", &stages).ok().as_deref(),
            Some("Q: What is 347 + 58? | prev: x | draft: 405")
        );
    }

    #[test]
    fn the_first_matching_route_picks_the_member() {
        let stage = Stage {
            name: "answer".into(),
            node: 0,
            template: "{{ request }}".into(),
            max_chars: 10,
            fallback: None,
            routes: vec![
                (regex::Regex::new("<think>").expect("valid pattern"), 1),
                (regex::Regex::new("^[A-Z]").expect("valid pattern"), 2),
            ],
        };
        assert_eq!(route(&stage, "<think>3+4</think>7"), 1);
        assert_eq!(route(&stage, "Tarn"), 2);
        assert_eq!(route(&stage, "blarches"), 0);
    }

    #[test]
    fn the_request_text_is_the_last_user_message() {
        let conv = pb::Prompt {
            kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                messages: vec![
                    pb::ChatMessage {
                        role: "user".into(),
                        content: "first".into(),
                    },
                    pb::ChatMessage {
                        role: "assistant".into(),
                        content: "a".into(),
                    },
                    pb::ChatMessage {
                        role: "user".into(),
                        content: "second".into(),
                    },
                ],
            })),
        };
        assert_eq!(request_text(Some(&conv)), "second");
    }
}
