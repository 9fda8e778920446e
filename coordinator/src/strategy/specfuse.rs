//! SpecFuse: propose / verify rounds with model exit, as a synchronous state machine.
//!
//! One [`SpecFuse`] lives for one request. Each round the caller (the async fan-out):
//! 1. asks every [active](SpecFuse::active_nodes) node for a draft of up to
//!    [`segment_tokens`](SpecFuseParams::segment_tokens) tokens;
//! 2. passes the drafts to [`SpecFuse::prepare_drafts`], which cuts them to word boundaries, drops
//!    empty ones and merges identical texts into distinct [`Candidate`]s;
//! 3. sends [`Drafts::texts`] to every active node's `ScoreCandidates` and passes the
//!    `mean_logprob`s to [`SpecFuse::combine`], which picks the winner, applies the exit rule and
//!    (optionally) SpecEM's online weights, and reports all of it in a [`RoundOutcome`];
//! 4. appends the winner's text to the answer, and stops when [`Winner::ends_answer`] is set.
//!
//! A node whose call fails is removed with [`SpecFuse::node_failed`]. `specfuse/run.rs` is the async
//! driver and the strategy's registration ([`SpecFuseStrategy`]); `specfuse/drafts.rs` cuts and merges
//! drafts. The algorithm is the one in
//! `ALGORITHMS.md` ("SpecFuse"); choices marked **ours** there are options documented below.

mod drafts;
mod run;
#[cfg(test)]
mod tests;

pub use drafts::{Candidate, CutDraft, DraftText, Drafts, DropReason, DroppedDraft};
pub use run::{SpecFuseAnswer, SpecFuseStrategy, specfuse};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_positive, check_weights, normalised_weights};
use crate::math::softmax;

/// SpecFuse's settings. Every field has a default (`#[serde(default)]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpecFuseParams {
    /// L: most tokens per draft (`max_new_tokens` of `ProposeSegment`), 1..=4096. Default 10.
    pub segment_tokens: u32,
    /// w_j: one weight per node, each finite and > 0; only ratios matter. Default `None`: uniform.
    pub weights: Option<Vec<f64>>,
    /// Whether a verifier's vote counts for the candidate it proposed itself. Default true.
    ///
    /// With `false`, candidate c's score averages only the verifiers that did not propose c (weights
    /// renormalised over those, per candidate); a candidate that only its own proposers verified
    /// scores 0. Each verifier's q_j is still a softmax over *all* candidates.
    pub self_votes: bool,
    /// Whether a draft that may end mid-word is cut back to its last word boundary (see
    /// [`SpecFuse::prepare_drafts`]). Default true; turn off for scripts without spaces.
    pub cut_to_word_boundary: bool,
    /// The model-exit rule.
    pub exit: ExitParams,
    /// SpecEM's online weights (**option**). Default `None`: weights stay fixed.
    pub online_weights: Option<OnlineWeights>,
    /// **Ours**: verifiers score drafts as string prefixes (`ScoreRequest.string_prefix`), so a draft
    /// that ends inside a verifier's token is priced by every token path that spells it. Default false.
    pub string_prefix: bool,
    /// **Ours**: a draft's score is its log-probability per character instead of per token of the
    /// verifier's canonical tokenization (tokenizer-independent). Default false.
    pub per_char: bool,
    /// The confidence gate (GaC's thresholded mode), in (0, 1]: the lead node ([`SpecFuse::lead`])
    /// drafts alone first, and a draft whose every token had at least this probability wins the
    /// round unverified ([`SpecFuse::accept_lead`]). Default `None`: off.
    pub gate: Option<f64>,
}

impl Default for SpecFuseParams {
    fn default() -> Self {
        Self {
            segment_tokens: 10,
            weights: None,
            self_votes: true,
            cut_to_word_boundary: true,
            exit: ExitParams::default(),
            online_weights: None,
            string_prefix: false,
            per_char: false,
            gate: None,
        }
    }
}

/// The model-exit rule: Q_i accumulates the combined score of node i's draft; after `warmup_rounds`
/// rounds, p = softmax(Q / tau) over active nodes and node i leaves when p_i < delta / |active|.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExitParams {
    /// Whether nodes may leave a request. Default true.
    pub enabled: bool,
    /// δ, in [0, 1]: a node leaves when its share is below δ times the uniform share. 0 never exits.
    /// Default 0.5.
    pub delta: f64,
    /// τ, finite and > 0: temperature of the softmax over cumulative scores. Default 1.0.
    pub tau: f64,
    /// R: rounds before any node may leave; the rule first applies in round R + 1. Default 1.
    pub warmup_rounds: u64,
    /// Exits never leave fewer active nodes than this (failures may). At least 1. Default 1.
    pub min_active: usize,
}

impl Default for ExitParams {
    fn default() -> Self {
        Self {
            enabled: true,
            delta: 0.5,
            tau: 1.0,
            warmup_rounds: 1,
            min_active: 1,
        }
    }
}

/// SpecEM's online weight update (see [`SpecFuse::combine`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineWeights {
    /// Learning rate `lr`, finite and > 0: η_t = lr · sqrt(1/K) / t.
    pub lr: f64,
}

impl SpecFuseParams {
    /// Checks every field; the error names the parameter, its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        if !(1..=4096).contains(&self.segment_tokens) {
            return Err(Error::invalid(
                "segment_tokens",
                self.segment_tokens,
                "an integer in 1..=4096",
            ));
        }
        if let Some(w) = &self.weights {
            check_weights(w, None)?;
        }
        let e = &self.exit;
        if !(e.delta.is_finite() && (0.0..=1.0).contains(&e.delta)) {
            return Err(Error::invalid("exit.delta", e.delta, "a finite number in [0, 1]"));
        }
        check_positive("exit.tau", e.tau)?;
        if e.min_active == 0 {
            return Err(Error::invalid("exit.min_active", e.min_active, "an integer >= 1"));
        }
        if let Some(o) = &self.online_weights {
            check_positive("online_weights.lr", o.lr)?;
        }
        if let Some(g) = self.gate
            && !(g.is_finite() && g > 0.0 && g <= 1.0)
        {
            return Err(Error::invalid("gate", g, "a number in (0, 1] (unset = off)"));
        }
        Ok(())
    }
}

/// The winner of a round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Winner {
    /// Index of the winning candidate; `None` when no node drafted text and the answer ends.
    pub candidate: Option<usize>,
    /// The node credited with the win: the candidate's lowest proposer.
    pub node: usize,
    /// The text to append to the answer (empty when `candidate` is `None`).
    pub text: String,
    /// Whether the answer ends after this text.
    pub ends_answer: bool,
}

/// One verifier's answer, as used this round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifierReport {
    /// The verifying node.
    pub node: usize,
    /// Its weight w_j before this round's update (weights sum to 1 over all nodes).
    pub weight: f64,
    /// s_j: mean log-probability of each candidate under this node.
    pub scores: Vec<f64>,
    /// q_j = softmax(s_j) over the candidates.
    pub q: Vec<f64>,
}

/// Why a verifier's answer was ignored this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IgnoreReason {
    /// The node is not active in this request.
    Inactive,
    /// A second answer from the same node; the first one given is used.
    Duplicate,
    /// Not one score per candidate.
    WrongCount {
        /// Number of candidates.
        expected: usize,
        /// Number of scores returned.
        got: usize,
    },
    /// A NaN or `+inf` score, or every score `-inf`: no distribution can be formed. (A single `-inf`
    /// is fine: that candidate gets q = 0.)
    NonFinite,
}

/// A verifier answer that was ignored, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IgnoredVerifier {
    /// The node.
    pub node: usize,
    /// Why.
    pub reason: IgnoreReason,
    /// The scores it returned.
    pub scores: Vec<f64>,
}

/// A node leaving the request through the exit rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NodeExit {
    /// The node.
    pub node: usize,
    /// Its p_i = softmax(Q / τ)_i.
    pub p: f64,
    /// δ / |active|, which p_i fell below.
    pub threshold: f64,
}

/// The exit rule's work this round (present once the warm-up is over and exit is enabled).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExitCheck {
    /// p_i for every active node, ascending by node.
    pub probs: Vec<(usize, f64)>,
    /// δ / |active|.
    pub threshold: f64,
    /// Nodes that left, lowest p first.
    pub exited: Vec<NodeExit>,
    /// Nodes below the threshold that stayed because of `min_active`.
    pub spared: Vec<usize>,
}

/// Everything a round decided, for the caller and the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundOutcome {
    /// Round number, from 1.
    pub round: u64,
    /// Nodes active when the round was combined, ascending.
    pub active: Vec<usize>,
    /// The distinct candidates with their proposers.
    pub candidates: Vec<Candidate>,
    /// Verifier answers used, in the order given.
    pub verifiers: Vec<VerifierReport>,
    /// Verifier answers ignored, and why.
    pub ignored_verifiers: Vec<IgnoredVerifier>,
    /// score_c for each candidate.
    pub combined: Vec<f64>,
    /// The winner.
    pub winner: Winner,
    /// Q_i after this round, for every node (nodes no longer active keep their last value).
    pub cumulative: Vec<f64>,
    /// The exit rule's work; `None` during warm-up, when exit is disabled, or when no text was drafted.
    pub exit: Option<ExitCheck>,
    /// SpecEM rewards per active node, when online weights ran this round.
    pub rewards: Vec<(usize, f64)>,
    /// Node weights after the round (sum 1).
    pub weights: Vec<f64>,
}

impl RoundOutcome {
    /// Nodes that left the request this round through the exit rule.
    pub fn exited(&self) -> Vec<usize> {
        self.exit
            .as_ref()
            .map(|e| e.exited.iter().map(|x| x.node).collect())
            .unwrap_or_default()
    }
}

/// The SpecFuse state of one request over `n` nodes (indices `0..n`).
#[derive(Debug, Clone)]
pub struct SpecFuse {
    params: SpecFuseParams,
    weights: Vec<f64>,
    active: Vec<bool>,
    cumulative: Vec<f64>,
    rounds: u64,
    active_node_rounds: u64,
}

impl SpecFuse {
    /// Starts a request over `nodes` nodes, all active. Validates `params`; the weights, if given,
    /// must be one per node.
    pub fn new(params: SpecFuseParams, nodes: usize) -> Result<Self> {
        params.validate()?;
        let weights = normalised_weights(params.weights.as_deref(), nodes)?;
        Ok(Self {
            params,
            weights,
            active: vec![true; nodes],
            cumulative: vec![0.0; nodes],
            rounds: 0,
            active_node_rounds: 0,
        })
    }

    /// The settings.
    pub fn params(&self) -> &SpecFuseParams {
        &self.params
    }

    /// Number of nodes (active or not).
    pub fn nodes(&self) -> usize {
        self.active.len()
    }

    /// Whether `node` is still in the request.
    pub fn is_active(&self, node: usize) -> bool {
        self.active.get(node).copied().unwrap_or(false)
    }

    /// Nodes still in the request, ascending.
    pub fn active_nodes(&self) -> Vec<usize> {
        (0..self.active.len()).filter(|&i| self.active[i]).collect()
    }

    /// Current node weights (sum 1 over all nodes).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Q_i, the cumulative score of each node's drafts.
    pub fn cumulative(&self) -> &[f64] {
        &self.cumulative
    }

    /// Rounds combined so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Sum over rounds of the nodes active when the round was combined.
    pub fn active_node_rounds(&self) -> u64 {
        self.active_node_rounds
    }

    /// Mean active nodes per round (the paper's cost figure); `None` before the first round.
    pub fn mean_active_nodes(&self) -> Option<f64> {
        (self.rounds > 0).then(|| self.active_node_rounds as f64 / self.rounds as f64)
    }

    /// Removes `node` from the request after a failed call (the fault path; `min_active` does not
    /// apply). Returns [`Error::NoActiveNode`] when no node is left (the node is removed all the
    /// same) and [`Error::UnknownNode`] for an index outside the ensemble.
    pub fn node_failed(&mut self, node: usize) -> Result<()> {
        let nodes = self.active.len();
        let slot = self
            .active
            .get_mut(node)
            .ok_or(Error::UnknownNode { node, nodes })?;
        *slot = false;
        if self.active.iter().any(|&a| a) {
            Ok(())
        } else {
            Err(Error::NoActiveNode)
        }
    }

    /// Turns the round's raw drafts into distinct candidates.
    ///
    /// - With [`cut_to_word_boundary`](SpecFuseParams::cut_to_word_boundary), a draft that did not end
    ///   the answer and whose last character is a letter, digit, `_`, apostrophe or hyphen is cut back
    ///   to before its last whitespace-separated word (and the whitespace before it). **ours**: a
    ///   draft with no such boundary (one partial word) is kept whole, so the answer always advances.
    /// - Empty drafts are dropped (recorded, with whether they ended the answer).
    /// - Drafts from nodes that are not active, unknown, or repeated are dropped (recorded).
    /// - Identical texts become one [`Candidate`] listing all proposers; candidates are ordered by
    ///   lowest proposer.
    pub fn prepare_drafts(&self, raw: Vec<(usize, DraftText)>) -> Drafts {
        drafts::build(raw, &self.active, self.params.cut_to_word_boundary)
    }

    /// Combines the verifiers' scores, picks the winner, applies the exit rule and online weights.
    ///
    /// `scores` holds, per verifier j, `mean_logprob` of every candidate of `drafts` in order.
    /// - A verifier is **ignored for the round** when it is not active, answers twice, returns the
    ///   wrong number of scores, or returns a NaN / `+inf` score or only `-inf` (see
    ///   [`IgnoreReason`]); the remaining weights are renormalised.
    /// - q_j = softmax_c(s_jc); score_c = Σ_j w_j q_jc / Σ_j w_j over the verifiers used for c (all
    ///   that answered, or those that did not propose c when `self_votes` is false; 0 if none).
    /// - Winner: the highest score_c; ties go to the candidate with the lower proposer index.
    /// - EXIT: Q_i += score of node i's own candidate (0 if it drafted nothing), for every active
    ///   node. From round R + 1 on, p = softmax(Q / τ) over active nodes; nodes with
    ///   p_i < δ / |active| leave, lowest p first (ties: higher node index first), while more than
    ///   `min_active` nodes remain.
    /// - Online weights (SpecEM), when enabled, over the K nodes active at the start of the round:
    ///   wins_i counts pairs (j, k), j ≠ i, k ≠ i, both active, where verifier j was used this round
    ///   and i drafted, and either k drafted nothing or s_j(i's draft) ≥ s_j(k's draft);
    ///   reward_i = wins_i / (K−1)²; w_i ← w_i · exp(η_t · reward_i) with η_t = lr · sqrt(1/K) / t
    ///   (t = this round's number); weights are then renormalised to sum 1. Skipped when K < 2.
    ///
    /// **ours**: when no node drafted text but some node's empty draft ended the answer, the round
    /// ends the answer (empty winner text, credited to the lowest such node) and needs no scores.
    ///
    /// Errors ([`Error::NoActiveNode`], [`Error::NoCandidates`], [`Error::NoVerifier`],
    /// [`Error::UnknownNode`], [`Error::DraftsMismatch`]) leave the state unchanged.
    pub fn combine(&mut self, drafts: &Drafts, scores: &[(usize, Vec<f64>)]) -> Result<RoundOutcome> {
        let n = self.active.len();
        if drafts.nodes != n {
            return Err(Error::DraftsMismatch {
                expected: n,
                got: drafts.nodes,
            });
        }
        if let Some(&(node, _)) = scores.iter().find(|(node, _)| *node >= n) {
            return Err(Error::UnknownNode { node, nodes: n });
        }
        let active = self.active_nodes();
        if active.is_empty() {
            return Err(Error::NoActiveNode);
        }
        if drafts.is_empty() {
            let node = *drafts.ended_empty().first().ok_or(Error::NoCandidates)?;
            self.start_round(active.len());
            return Ok(self.outcome(
                active,
                drafts,
                Winner {
                    candidate: None,
                    node,
                    text: String::new(),
                    ends_answer: true,
                },
            ));
        }

        let (verifiers, ignored) = self.check_verifiers(drafts.candidates.len(), scores);
        if verifiers.is_empty() {
            return Err(Error::NoVerifier {
                ignored: ignored.len(),
            });
        }
        let combined: Vec<f64> = drafts
            .candidates
            .iter()
            .enumerate()
            .map(|(c, cand)| {
                let used = verifiers
                    .iter()
                    .filter(|v| self.params.self_votes || !cand.proposers.contains(&v.node));
                let (num, den) = used.fold((0.0, 0.0), |(num, den), v| {
                    (num + v.weight * v.q[c], den + v.weight)
                });
                if den > 0.0 { num / den } else { 0.0 }
            })
            .collect();
        let mut best = 0;
        for (c, &s) in combined.iter().enumerate() {
            if s > combined[best] {
                best = c;
            }
        }
        let cand = &drafts.candidates[best];
        let winner = Winner {
            candidate: Some(best),
            node: cand.proposers.first().copied().unwrap_or_default(),
            text: cand.text.clone(),
            ends_answer: cand.ends_answer,
        };

        self.start_round(active.len());
        for &i in &active {
            self.cumulative[i] += drafts.candidate_of(i).map_or(0.0, |c| combined[c]);
        }
        let exit = self.apply_exit();
        let rewards = self.update_weights(&active, drafts, &verifiers);

        let mut out = self.outcome(active, drafts, winner);
        out.verifiers = verifiers;
        out.ignored_verifiers = ignored;
        out.combined = combined;
        out.exit = exit;
        out.rewards = rewards;
        out.weights = self.weights.clone();
        Ok(out)
    }

    /// The node that drafts alone first under the confidence gate: the active node with the highest
    /// cumulative score Q (its drafts' combined scores so far), then the larger weight, then the lower
    /// index. None when no node is active.
    pub fn lead(&self) -> Option<usize> {
        let key = |i: usize| (self.cumulative[i], self.weights[i]);
        self.active_nodes()
            .into_iter()
            .fold(None, |best: Option<usize>, i| match best {
                Some(b) if key(b) >= key(i) => Some(b),
                _ => Some(i),
            })
    }

    /// A round the confidence gate let `lead` decide alone: its draft (the only one in `drafts`)
    /// wins unverified. Counts as a round with one active node; no score is added to Q and the exit
    /// rule does not run (no other node took part).
    ///
    /// Errors: [`Error::NoCandidates`] when the lead's draft is empty and does not end the answer.
    pub fn accept_lead(&mut self, drafts: &Drafts, lead: usize) -> Result<RoundOutcome> {
        let winner = match drafts.candidate_of(lead) {
            Some(c) => {
                let cand = &drafts.candidates[c];
                Winner {
                    candidate: Some(c),
                    node: lead,
                    text: cand.text.clone(),
                    ends_answer: cand.ends_answer,
                }
            }
            None if drafts.ended_empty().contains(&lead) => Winner {
                candidate: None,
                node: lead,
                text: String::new(),
                ends_answer: true,
            },
            None => return Err(Error::NoCandidates),
        };
        self.start_round(1);
        let mut out = self.outcome(vec![lead], drafts, winner);
        out.weights = self.weights.clone();
        Ok(out)
    }

    fn start_round(&mut self, active: usize) {
        self.rounds += 1;
        self.active_node_rounds += active as u64;
    }

    fn outcome(&self, active: Vec<usize>, drafts: &Drafts, winner: Winner) -> RoundOutcome {
        RoundOutcome {
            round: self.rounds,
            active,
            candidates: drafts.candidates.clone(),
            verifiers: Vec::new(),
            ignored_verifiers: Vec::new(),
            combined: Vec::new(),
            winner,
            cumulative: self.cumulative.clone(),
            exit: None,
            rewards: Vec::new(),
            weights: self.weights.clone(),
        }
    }

    /// Splits verifier answers into used ones (with q computed) and ignored ones.
    fn check_verifiers(
        &self,
        candidates: usize,
        scores: &[(usize, Vec<f64>)],
    ) -> (Vec<VerifierReport>, Vec<IgnoredVerifier>) {
        let mut used: Vec<VerifierReport> = Vec::new();
        let mut ignored = Vec::new();
        for (node, s) in scores {
            let q = softmax(s);
            let reason = if !self.is_active(*node) {
                Some(IgnoreReason::Inactive)
            } else if used.iter().any(|v| v.node == *node) {
                Some(IgnoreReason::Duplicate)
            } else if s.len() != candidates {
                Some(IgnoreReason::WrongCount {
                    expected: candidates,
                    got: s.len(),
                })
            } else if q.is_none() {
                Some(IgnoreReason::NonFinite)
            } else {
                None
            };
            match (reason, q) {
                (None, Some(q)) => {
                    used.push(VerifierReport {
                        node: *node,
                        weight: self.weights[*node],
                        scores: s.clone(),
                        q,
                    });
                }
                (reason, _) => ignored.push(IgnoredVerifier {
                    node: *node,
                    reason: reason.unwrap_or(IgnoreReason::NonFinite),
                    scores: s.clone(),
                }),
            }
        }
        (used, ignored)
    }

    /// The exit rule; runs after Q has been updated for this round.
    fn apply_exit(&mut self) -> Option<ExitCheck> {
        let e = &self.params.exit;
        if !e.enabled || self.rounds <= e.warmup_rounds {
            return None;
        }
        let active = self.active_nodes();
        let scaled: Vec<f64> = active.iter().map(|&i| self.cumulative[i] / e.tau).collect();
        let p = softmax(&scaled)?;
        let threshold = e.delta / active.len() as f64;
        let probs: Vec<(usize, f64)> = active.iter().copied().zip(p).collect();
        let mut below: Vec<(usize, f64)> = probs.iter().copied().filter(|&(_, p)| p < threshold).collect();
        below.sort_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        let allowed = active.len().saturating_sub(e.min_active);
        let mut check = ExitCheck {
            probs,
            threshold,
            exited: Vec::new(),
            spared: Vec::new(),
        };
        for (k, (node, p)) in below.into_iter().enumerate() {
            if k < allowed {
                self.active[node] = false;
                check.exited.push(NodeExit { node, p, threshold });
            } else {
                check.spared.push(node);
            }
        }
        Some(check)
    }

    /// SpecEM's online weight update; returns the rewards (empty when not run).
    fn update_weights(
        &mut self,
        active: &[usize],
        drafts: &Drafts,
        verifiers: &[VerifierReport],
    ) -> Vec<(usize, f64)> {
        let Some(ow) = &self.params.online_weights else {
            return Vec::new();
        };
        let k_nodes = active.len();
        if k_nodes < 2 {
            return Vec::new();
        }
        let pairs = ((k_nodes - 1) * (k_nodes - 1)) as f64;
        let eta = ow.lr * (1.0 / k_nodes as f64).sqrt() / self.rounds as f64;
        let mut rewards = Vec::with_capacity(k_nodes);
        for &i in active {
            let mut wins = 0usize;
            if let Some(ci) = drafts.candidate_of(i) {
                for v in verifiers
                    .iter()
                    .filter(|v| v.node != i && active.contains(&v.node))
                {
                    for &k in active.iter().filter(|&&k| k != i) {
                        let beats = drafts
                            .candidate_of(k)
                            .is_none_or(|ck| v.scores[ci] >= v.scores[ck]);
                        wins += usize::from(beats);
                    }
                }
            }
            rewards.push((i, wins as f64 / pairs));
        }
        for &(i, r) in &rewards {
            self.weights[i] *= (eta * r).exp();
        }
        let total: f64 = self.weights.iter().sum();
        if total.is_finite() && total > 0.0 {
            self.weights.iter_mut().for_each(|w| *w /= total);
        }
        rewards
    }
}
