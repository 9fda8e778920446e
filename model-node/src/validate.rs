//! Request validation: protobuf messages → the engine's typed jobs, or `INVALID_ARGUMENT` with a
//! message that names the field, the value and the allowed range. Never panics (property-tested).

use ensemble_proto::limits::InputLimits;
use ensemble_proto::v1 as pb;

use crate::chars::CharOptions;
use crate::engine::{ContextBody, ContextSpec, NextCharsParams, PromptSpec, ProposeParams};
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::template::Message;

/// Most new tokens per proposal.
pub const MAX_NEW_TOKENS: u32 = 4096;
/// Most stop strings.
pub const MAX_STOP: usize = 16;
/// Most bytes in a stop string.
pub const MAX_STOP_BYTES: usize = 256;
/// Most candidates per ScoreCandidates call.
pub const MAX_CANDIDATES: usize = 64;
/// Most bytes per candidate.
pub const MAX_CANDIDATE_BYTES: usize = 16 * 1024;
/// Most characters returned by NextCharDistribution.
pub const MAX_TOP_CHARS: u32 = 256;
/// Most hypotheses a client may ask for.
pub const MAX_HYPOTHESES: u32 = 64;
/// Longest session id.
pub const MAX_SESSION_ID: usize = 128;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The size of a call's text against `limits`, before anything else looks at it.
pub fn input(ctx: Option<&pb::Context>, limits: &InputLimits) -> Result<()> {
    let check = match ctx.and_then(|c| c.body.as_ref()) {
        Some(pb::context::Body::Full(full)) => match &full.prompt {
            Some(p) => limits.check_prompt(p, &full.answer),
            None => limits.check_append(&full.answer),
        },
        Some(pb::context::Body::Delta(d)) => limits.check_append(&d.append),
        None => Ok(()),
    };
    check.map_err(invalid)
}

/// The context of a call.
pub fn context(ctx: Option<pb::Context>) -> Result<ContextSpec> {
    let ctx = ctx.ok_or_else(|| invalid("context is required"))?;
    if ctx.session_id.len() > MAX_SESSION_ID {
        return Err(invalid(format!(
            "context.session_id is {} bytes; at most {MAX_SESSION_ID}",
            ctx.session_id.len()
        )));
    }
    let body = match ctx.body {
        None => {
            return Err(invalid(
                "context needs `full` (prompt and answer) or `delta` (append to a session)",
            ));
        }
        Some(pb::context::Body::Full(full)) => {
            let prompt = full.prompt.and_then(|p| p.kind).ok_or_else(|| {
                invalid(
                    "context.full.prompt needs `conversation` or `raw` (raw may be empty: start from BOS)",
                )
            })?;
            let prompt = match prompt {
                pb::prompt::Kind::Raw(r) => PromptSpec::Raw(r),
                pb::prompt::Kind::Conversation(c) => {
                    if c.messages.is_empty() {
                        return Err(invalid("context.full.prompt.conversation has no messages"));
                    }
                    let mut msgs = Vec::with_capacity(c.messages.len());
                    for (i, m) in c.messages.into_iter().enumerate() {
                        if m.role.is_empty() || m.role.len() > 32 {
                            return Err(invalid(format!(
                                "message {i}: role must be 1..=32 bytes (\"system\", \"user\" or \"assistant\"), got {:?}",
                                m.role
                            )));
                        }
                        msgs.push(Message {
                            role: m.role,
                            content: m.content,
                        });
                    }
                    PromptSpec::Chat(msgs)
                }
            };
            ContextBody::Full {
                prompt,
                answer: full.answer,
            }
        }
        Some(pb::context::Body::Delta(d)) => {
            if ctx.session_id.is_empty() {
                return Err(invalid(
                    "context.delta needs context.session_id: a delta appends to an existing session",
                ));
            }
            ContextBody::Delta {
                base_chars: d.base_chars,
                append: d.append,
            }
        }
    };
    if let Some(l) = ctx.rtd_lambda
        && !(0.0..1.0).contains(&l)
    {
        return Err(invalid(format!("context.rtd_lambda must be in [0, 1), got {l}")));
    }
    Ok(ContextSpec {
        session: ctx.session_id,
        body,
        rtd_lambda: ctx.rtd_lambda,
    })
}

/// Sampling settings.
pub fn sampling(s: Option<pb::Sampling>) -> Result<SamplingParams> {
    let s = s.unwrap_or_default();
    if !s.temperature.is_finite() || s.temperature < 0.0 || s.temperature > 100.0 {
        return Err(invalid(format!(
            "sampling.temperature must be in [0, 100] (0 = greedy), got {}",
            s.temperature
        )));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(format!("sampling.top_p must be in (0, 1], got {top_p}")));
    }
    if s.top_k == Some(0) {
        return Err(invalid(
            "sampling.top_k must be at least 1 (leave it unset to keep every token)",
        ));
    }
    Ok(SamplingParams {
        temperature: s.temperature,
        top_p,
        top_k: s.top_k.map(|k| k as usize),
        seed: s.seed,
    })
}

/// A ProposeSegment request.
pub fn propose(r: pb::ProposeRequest) -> Result<(ContextSpec, ProposeParams)> {
    if r.max_new_tokens == 0 || r.max_new_tokens > MAX_NEW_TOKENS {
        return Err(invalid(format!(
            "max_new_tokens must be in 1..={MAX_NEW_TOKENS}, got {}",
            r.max_new_tokens
        )));
    }
    if r.stop.len() > MAX_STOP {
        return Err(invalid(format!(
            "at most {MAX_STOP} stop strings, got {}",
            r.stop.len()
        )));
    }
    if let Some((i, s)) = r
        .stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(format!(
            "stop[{i}] must be 1..={MAX_STOP_BYTES} bytes, got {}",
            s.len()
        )));
    }
    if let Some(t) = r.defer_threshold
        && !(t.is_finite() && t > 0.0 && t < 1.0)
    {
        return Err(invalid(format!(
            "defer_threshold must be in (0, 1) exclusive (a deferral probability; leave it unset for no deferral), got {t}"
        )));
    }
    let sampling = sampling(r.sampling)?;
    let ctx = context(r.context)?;
    Ok((
        ctx,
        ProposeParams {
            max_new_tokens: r.max_new_tokens as usize,
            stop: r.stop,
            sampling,
            defer_threshold: r.defer_threshold,
        },
    ))
}

/// A ScoreCandidates request.
/// A ScoreCandidates request: the context, the candidates and, per candidate, whether it ends the
/// answer (all false when `ends_answer` is empty).
pub fn score(r: pb::ScoreRequest) -> Result<(ContextSpec, Vec<String>, Vec<bool>)> {
    if r.candidates.is_empty() {
        return Err(invalid(
            "candidates is empty: give 1 to 64 candidate texts to score",
        ));
    }
    if r.candidates.len() > MAX_CANDIDATES {
        return Err(invalid(format!(
            "at most {MAX_CANDIDATES} candidates per call, got {}",
            r.candidates.len()
        )));
    }
    if let Some((i, c)) = r
        .candidates
        .iter()
        .enumerate()
        .find(|(_, c)| c.is_empty() || c.len() > MAX_CANDIDATE_BYTES)
    {
        return Err(invalid(format!(
            "candidates[{i}] must be 1..={MAX_CANDIDATE_BYTES} bytes, got {}",
            c.len()
        )));
    }
    let ends = if r.ends_answer.is_empty() {
        vec![false; r.candidates.len()]
    } else if r.ends_answer.len() == r.candidates.len() {
        r.ends_answer
    } else {
        return Err(invalid(format!(
            "ends_answer must be empty or one flag per candidate ({}), got {}",
            r.candidates.len(),
            r.ends_answer.len()
        )));
    };
    Ok((context(r.context)?, r.candidates, ends))
}

/// A NextCharDistribution request; `defaults` are the node's options.
pub fn next_char(
    r: pb::NextCharRequest,
    defaults: &CharOptions,
) -> Result<(ContextSpec, usize, CharOptions)> {
    if r.top_k == 0 || r.top_k > MAX_TOP_CHARS {
        return Err(invalid(format!(
            "top_k must be in 1..={MAX_TOP_CHARS}, got {}",
            r.top_k
        )));
    }
    let mut opts = defaults.clone();
    if let Some(h) = r.max_hypotheses {
        if h == 0 || h > MAX_HYPOTHESES {
            return Err(invalid(format!(
                "max_hypotheses must be in 1..={MAX_HYPOTHESES}, got {h}"
            )));
        }
        opts.max_hypotheses = h as usize;
    }
    if let Some(l) = r.lookahead {
        opts.lookahead = l;
    }
    Ok((context(r.context)?, r.top_k as usize, opts))
}

/// Most characters of a NextCharDistributions continuation.
pub const MAX_CONTINUATION_CHARS: usize = 1024;
/// Most characters a NextCharDistributions call may draft.
pub const MAX_DRAFT_CHARS: u32 = 256;

/// A NextCharDistributions request; `defaults` are the node's options.
pub fn next_chars(r: pb::NextCharsRequest, defaults: &CharOptions) -> Result<(ContextSpec, NextCharsParams)> {
    let n = r.continuation.chars().count();
    if n > MAX_CONTINUATION_CHARS {
        return Err(invalid(format!(
            "continuation must be at most {MAX_CONTINUATION_CHARS} characters, got {n}"
        )));
    }
    if r.draft_chars > MAX_DRAFT_CHARS {
        return Err(invalid(format!(
            "draft_chars must be in 0..={MAX_DRAFT_CHARS}, got {}",
            r.draft_chars
        )));
    }
    let (ctx, top_k, opts) = next_char(
        pb::NextCharRequest {
            context: r.context,
            top_k: r.top_k,
            max_hypotheses: r.max_hypotheses,
            lookahead: r.lookahead,
        },
        defaults,
    )?;
    Ok((
        ctx,
        NextCharsParams {
            continuation: r.continuation,
            draft_chars: r.draft_chars as usize,
            top_k,
            opts,
            observed: r.observed,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw_ctx() -> Option<pb::Context> {
        Some(pb::Context {
            rtd_lambda: None,
            session_id: String::new(),
            body: Some(pb::context::Body::Full(pb::FullContext {
                prompt: Some(pb::Prompt {
                    kind: Some(pb::prompt::Kind::Raw("hi".into())),
                }),
                answer: String::new(),
            })),
        })
    }

    #[test]
    fn ends_answer_is_empty_or_one_flag_per_candidate() {
        let req = |ends: Vec<bool>| pb::ScoreRequest {
            context: raw_ctx(),
            candidates: vec!["a".into(), "b".into()],
            string_prefix: true,
            ends_answer: ends,
        };
        assert!(matches!(score(req(vec![])), Ok((_, _, e)) if e == vec![false, false]));
        assert!(matches!(score(req(vec![true, false])), Ok((_, _, e)) if e == vec![true, false]));
        let e = score(req(vec![true]))
            .map(|_| ())
            .expect_err("one flag for two candidates");
        assert!(e.to_string().contains("ends_answer"), "{e}");
    }

    #[test]
    fn error_messages_name_the_field() {
        let msg = |e: Error| e.to_string();
        let r = pb::ProposeRequest {
            context: raw_ctx(),
            max_new_tokens: 0,
            ..Default::default()
        };
        assert!(msg(propose(r).err().map_or(invalid(""), |e| e)).contains("max_new_tokens"));
        let r = pb::ProposeRequest {
            context: raw_ctx(),
            max_new_tokens: 4,
            sampling: Some(pb::Sampling {
                temperature: -1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(msg(propose(r).err().map_or(invalid(""), |e| e)).contains("temperature"));
        let r = pb::ScoreRequest {
            context: raw_ctx(),
            candidates: vec![],
            string_prefix: false,
            ends_answer: vec![],
        };
        assert!(msg(score(r).err().map_or(invalid(""), |e| e)).contains("candidates is empty"));
        let delta = pb::Context {
            rtd_lambda: None,
            session_id: String::new(),
            body: Some(pb::context::Body::Delta(pb::ContextDelta {
                base_chars: 0,
                append: "x".into(),
            })),
        };
        assert!(msg(context(Some(delta)).err().map_or(invalid(""), |e| e)).contains("session_id"));
    }

    fn arb_context() -> impl Strategy<Value = Option<pb::Context>> {
        let prompt = prop_oneof![
            Just(None),
            ".{0,8}".prop_map(|r| Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Raw(r))
            })),
            proptest::collection::vec((".{0,40}", ".{0,8}"), 0..3).prop_map(|m| Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                    messages: m
                        .into_iter()
                        .map(|(role, content)| pb::ChatMessage { role, content })
                        .collect(),
                })),
            })),
        ];
        let body = prop_oneof![
            Just(None),
            (prompt, ".{0,8}").prop_map(|(prompt, answer)| Some(pb::context::Body::Full(pb::FullContext {
                prompt,
                answer
            }))),
            (any::<u64>(), ".{0,8}").prop_map(|(base_chars, append)| Some(pb::context::Body::Delta(
                pb::ContextDelta { base_chars, append }
            ))),
        ];
        proptest::option::of((".{0,200}", body).prop_map(|(session_id, body)| pb::Context {
            rtd_lambda: None,
            session_id,
            body,
        }))
    }

    proptest! {
        #[test]
        fn validation_never_panics(
            ctx in arb_context(),
            max_new in any::<u32>(),
            temp in any::<f32>(),
            top_p in proptest::option::of(any::<f32>()),
            top_k in proptest::option::of(any::<u32>()),
            stop in proptest::collection::vec(".{0,300}", 0..20),
            cands in proptest::collection::vec(".{0,4}", 0..70),
            char_k in any::<u32>(),
            hyps in proptest::option::of(any::<u32>()),
        ) {
            let sampling = Some(pb::Sampling { temperature: temp, top_p, top_k, seed: None });
            let p = propose(pb::ProposeRequest { context: ctx.clone(), max_new_tokens: max_new, stop, sampling, defer_threshold: None });
            if let Ok((_, params)) = &p {
                prop_assert!(params.max_new_tokens >= 1 && params.max_new_tokens <= MAX_NEW_TOKENS as usize);
                prop_assert!(params.sampling.temperature >= 0.0);
                prop_assert!(params.sampling.top_k != Some(0));
            }
            let s = score(pb::ScoreRequest { context: ctx.clone(), candidates: cands, string_prefix: false, ends_answer: vec![] });
            if let Ok((_, c, _)) = &s {
                prop_assert!(!c.is_empty() && c.iter().all(|c| !c.is_empty()));
            }
            let n = next_char(
                pb::NextCharRequest { context: ctx, top_k: char_k, max_hypotheses: hyps, lookahead: None },
                &CharOptions::default(),
            );
            if let Ok((_, k, o)) = &n {
                prop_assert!(*k >= 1 && o.max_hypotheses >= 1);
            }
        }
    }
}
