//! Co-LLM (Shen et al.), ours across tokenizers, as a synchronous state machine.
//!
//! A base member writes the answer; its deferral head (a vector per assistant over its last hidden
//! state, loaded by the node with `--deferral-head`) gives at every position the probability that an
//! assistant should write the next token. The node stops *before* the first token whose probability
//! exceeds η (`FINISH_REASON_DEFER`, with each head's probability there). The chosen assistant then
//! writes its next token (or up to its next word boundary: [`Handoff::Word`]) as **text**, which joins
//! every member's context, and the base resumes. `ALGORITHMS.md` ("Co-LLM") has the details.
//!
//! [`CoLlm`] decides what to ask next ([`CoLlm::next`]) and takes the answers ([`CoLlm::base_wrote`],
//! [`CoLlm::assistant_wrote`]); `colm/run.rs` is the async driver and the registration.

mod run;
#[cfg(test)]
mod tests;

pub use run::CoLlmStrategy;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::strategy::SpanStep;

/// What an assistant writes when the base defers to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Handoff {
    /// Its next token, as published.
    #[default]
    Token,
    /// Up to its next word boundary (at most [`CoLlmParams::word_tokens`] tokens).
    Word,
}

impl Handoff {
    /// Parses `token` / `word`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "token" => Some(Handoff::Token),
            "word" => Some(Handoff::Word),
            _ => None,
        }
    }
}

/// Co-LLM's settings (`[colm]` in the configuration; every field has a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoLlmParams {
    /// The base member. Default `None`: the first member whose node has a deferral head.
    pub base: Option<String>,
    /// The assistants it may defer to. Default empty: every member its deferral head names.
    pub assistants: Vec<String>,
    /// Deferral threshold η in (0, 1). Default `None`: the one stored with the head (chosen when it
    /// was trained).
    pub eta: Option<f64>,
    /// What an assistant writes at a deferral. Default [`Handoff::Token`].
    pub handoff: Handoff,
    /// Most base tokens per call (a call ends sooner when the base defers), 1..=4096. Default 32.
    pub segment_tokens: u32,
    /// Most assistant tokens per [`Handoff::Word`] handoff, 1..=64. Default 8.
    pub word_tokens: u32,
}

impl Default for CoLlmParams {
    fn default() -> Self {
        Self {
            base: None,
            assistants: vec![],
            eta: None,
            handoff: Handoff::Token,
            segment_tokens: 32,
            word_tokens: 8,
        }
    }
}

impl CoLlmParams {
    /// Checks the ranges (the members are checked when a request is planned).
    pub fn validate(&self) -> Result<()> {
        if let Some(eta) = self.eta
            && !(eta > 0.0 && eta < 1.0)
        {
            return Err(Error::bad_field(
                "colm.eta",
                format!("must be in (0, 1), got {eta}"),
            ));
        }
        if !(1..=4096).contains(&self.segment_tokens) {
            return Err(Error::bad_field(
                "colm.segment_tokens",
                format!("must be in 1..=4096, got {}", self.segment_tokens),
            ));
        }
        if !(1..=64).contains(&self.word_tokens) {
            return Err(Error::bad_field(
                "colm.word_tokens",
                format!("must be in 1..=64, got {}", self.word_tokens),
            ));
        }
        Ok(())
    }
}

/// A checked Co-LLM request: who is the base, which heads lead to which members.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The base member.
    pub base: usize,
    /// Per head of the base's deferral head, in head order: the member it defers to, when the request
    /// allows it.
    pub heads: Vec<Option<usize>>,
    /// η.
    pub eta: f64,
    /// What an assistant writes.
    pub handoff: Handoff,
    /// Most base tokens per call.
    pub segment_tokens: u32,
    /// Most assistant tokens per word handoff.
    pub word_tokens: u32,
}

/// The next call to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// The base writes up to `max_tokens`, stopping before a token it defers (`threshold`; `None`
    /// right after a handoff that added nothing, so that the answer always moves).
    Base {
        /// Most tokens.
        max_tokens: u32,
        /// η, or none.
        threshold: Option<f64>,
    },
    /// Assistant `node` writes its next `max_tokens` tokens (1 for a token handoff).
    Assistant {
        /// The member.
        node: usize,
        /// Most tokens.
        max_tokens: u32,
        /// The base's deferral probability for this assistant.
        prob: f64,
    },
}

/// One request's Co-LLM state.
#[derive(Debug)]
pub struct CoLlm {
    plan: Plan,
    next: Action,
    /// Spans written so far.
    spans: usize,
    /// Handoffs so far.
    deferrals: usize,
}

/// What the base wrote in one call, as the state machine reads it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BaseTurn {
    /// Its text.
    pub text: String,
    /// Whether it ended with EOS or a stop string (the answer ends).
    pub ends: bool,
    /// Whether it stopped to defer.
    pub deferred: bool,
    /// Each head's deferral probability where it stopped (empty unless `deferred`).
    pub head_probs: Vec<f32>,
    /// The deferral probability at each of its tokens.
    pub probs: Vec<f32>,
}

impl CoLlm {
    /// A request's state: the base writes first.
    pub fn new(plan: Plan) -> Self {
        let next = Action::Base {
            max_tokens: plan.segment_tokens,
            threshold: Some(plan.eta),
        };
        Self {
            plan,
            next,
            spans: 0,
            deferrals: 0,
        }
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The call to make next.
    pub fn next(&self) -> Action {
        self.next
    }

    /// Handoffs so far.
    pub fn deferrals(&self) -> usize {
        self.deferrals
    }

    /// Takes the base's turn: its span, and whether the answer ended. After a deferral the next call
    /// goes to the allowed assistant whose head is most sure; with none allowed the base goes on
    /// without deferring for one call.
    pub fn base_wrote(&mut self, t: BaseTurn) -> (SpanStep, bool) {
        self.spans += 1;
        let span = SpanStep {
            node: self.plan.base,
            text: t.text,
            deferred: false,
            defer_prob: 0.0,
            defer_probs: t.probs,
        };
        let base = |threshold| Action::Base {
            max_tokens: self.plan.segment_tokens,
            threshold,
        };
        self.next = match (
            t.ends,
            t.deferred.then(|| self.assistant_for(&t.head_probs)).flatten(),
        ) {
            (true, _) => base(Some(self.plan.eta)),
            (false, Some((node, prob))) => Action::Assistant {
                node,
                max_tokens: match self.plan.handoff {
                    Handoff::Token => 1,
                    Handoff::Word => self.plan.word_tokens,
                },
                prob,
            },
            // Deferred with no allowed assistant: the base writes the token itself.
            (false, None) if t.deferred => base(None),
            (false, None) => base(Some(self.plan.eta)),
        };
        (span, t.ends)
    }

    /// Takes an assistant's turn (`text` as it wrote it, `ends`: with EOS or a stop string): the
    /// span it adds (cut at the word boundary for a word handoff) and whether the answer ended.
    pub fn assistant_wrote(&mut self, text: &str, ends: bool) -> (SpanStep, bool) {
        let Action::Assistant { node, prob, .. } = self.next else {
            // Not asked: nothing is added.
            return (
                SpanStep {
                    node: self.plan.base,
                    text: String::new(),
                    deferred: false,
                    defer_prob: 0.0,
                    defer_probs: vec![],
                },
                false,
            );
        };
        self.spans += 1;
        self.deferrals += 1;
        let (text, ends) = match self.plan.handoff {
            Handoff::Token => (text, ends),
            Handoff::Word => match word_end(text) {
                Some(cut) => (&text[..cut], false),
                None => (text, ends),
            },
        };
        // An empty handoff adds nothing: the base writes the next token itself.
        let threshold = (!text.is_empty()).then_some(self.plan.eta);
        self.next = Action::Base {
            max_tokens: self.plan.segment_tokens,
            threshold,
        };
        (
            SpanStep {
                node,
                text: text.to_owned(),
                deferred: true,
                defer_prob: prob,
                defer_probs: vec![],
            },
            ends,
        )
    }

    /// The base writes on without deferring (its assistant failed).
    pub fn assistant_failed(&mut self) {
        self.next = Action::Base {
            max_tokens: self.plan.segment_tokens,
            threshold: None,
        };
    }

    /// The allowed assistant whose head is most sure, with its probability.
    fn assistant_for(&self, head_probs: &[f32]) -> Option<(usize, f64)> {
        self.plan
            .heads
            .iter()
            .zip(head_probs)
            .filter_map(|(m, &p)| Some(((*m)?, f64::from(p))))
            .fold(None, |best: Option<(usize, f64)>, (m, p)| match best {
                Some((_, bp)) if bp >= p => best,
                _ => Some((m, p)),
            })
    }
}

/// Where the first word of `text` ends (`None`: it runs to the end of the text). A word is a run of
/// letters and digits ("750", "Dairox") or a run of other visible characters ("</", "."), after any
/// leading whitespace: text without spaces, like arithmetic, still hands back at its first change
/// of kind.
pub fn word_end(text: &str) -> Option<usize> {
    let mut kind = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if kind.is_some() {
                return Some(i);
            }
            continue;
        }
        let alnum = c.is_alphanumeric();
        match kind {
            None => kind = Some(alnum),
            Some(k) if k != alnum => return Some(i),
            Some(_) => {}
        }
    }
    None
}
