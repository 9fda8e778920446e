//! CharED, coordinator side: mixing the nodes' next-character distributions and choosing the next
//! character (or the end of the answer).
//!
//! Each step the caller asks every node's `NextCharDistribution` (with [`CharEd::node_query`]),
//! passes the answers to [`CharEd::combine`], appends the chosen character to the answer on every
//! node, and stops on [`CharOutcome::Eos`]. The algorithm is the one in `ALGORITHMS.md` ("CharED").
//!
//! **ours**, the reading of a node's answer: a node lists its top-k characters, the EOS probability
//! and a residual (the mass of all unlisted characters). A character missing from a node's list gets
//! probability 0 from that node: its residual is spread over unlisted characters we cannot name, so
//! it is never assigned to any outcome and is never sampled. The mixture m therefore sums to
//! 1 − Σ_i w_i residual_i over the listed outcomes, and sampling renormalises over those.

mod run;
mod speculative;
#[cfg(test)]
mod tests;

pub use run::{CharEdAnswer, CharEdStrategy, chared};

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_weights, normalised_weights};

/// CharED's settings. Every field has a default (`#[serde(default)]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CharedParams {
    /// w_i: one weight per node, each finite and > 0; only ratios matter. Default `None`: uniform.
    pub weights: Option<Vec<f64>>,
    /// Sampling temperature, finite and >= 0. 0 (the default) is greedy: the argmax of m.
    pub temperature: f64,
    /// Nucleus mass in (0, 1], applied after the temperature. Default 1 (no cut).
    pub top_p: f64,
    /// Seed of the sampler (a `StdRng`); the same seed and inputs give the same characters. Default 0.
    pub seed: u64,
    /// The published CharED variant: each node keeps one hypothesis (the canonical tokenization) and
    /// does not look past token boundaries. Only passed on to the nodes (see [`CharEd::node_query`]).
    /// Default false: the exact method.
    pub published: bool,
    /// Characters each node lists (`top_k` of `NextCharRequest`), 1..=256. **ours**: default 32.
    pub top_k: u32,
    /// Outcomes reported in [`CharStep::alternatives`], 0..=256. Default 5.
    pub alternatives: usize,
    /// Speculative CharED ("Speculative CharED" in `ALGORITHMS.md`), 0..=256: a node drafts up to
    /// this many characters per round and the longest prefix the mixture agrees with is accepted
    /// ([`CharEd::accept_draft`]). 0 (the default) asks every node once per character.
    pub draft_chars: u32,
    /// The confidence gate (GaC's thresholded mode), in (0, 1]: while the lead node's own choice has
    /// probability >= this, it decides alone and the other nodes are not asked
    /// ([`CharEd::confident_prefix`]). Default `None`: every node is asked at every position.
    pub gate: Option<f64>,
    /// Per-context weights, in [0, 100]: at each character node i weighs `w_i · exp(−β · H_i)`, `H_i`
    /// the entropy (nats) of its own distribution there ([`NodeCharDist::entropy`]), renormalised
    /// over the nodes that answered. Default 0: the weights alone.
    pub entropy_beta: f64,
}

impl Default for CharedParams {
    fn default() -> Self {
        Self {
            weights: None,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            published: false,
            top_k: 32,
            alternatives: 5,
            draft_chars: 0,
            gate: None,
            entropy_beta: 0.0,
        }
    }
}

impl CharedParams {
    /// Checks every field; the error names the parameter, its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = &self.weights {
            check_weights(w, None)?;
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                self.temperature,
                "a finite number >= 0 (0 = greedy)",
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", self.top_p, "a number in (0, 1]"));
        }
        if !(1..=256).contains(&self.top_k) {
            return Err(Error::invalid("top_k", self.top_k, "an integer in 1..=256"));
        }
        if let Some(g) = self.gate
            && !(g.is_finite() && g > 0.0 && g <= 1.0)
        {
            return Err(Error::invalid("gate", g, "a number in (0, 1] (unset = off)"));
        }
        if !(self.entropy_beta.is_finite() && (0.0..=100.0).contains(&self.entropy_beta)) {
            return Err(Error::invalid(
                "entropy_beta",
                self.entropy_beta,
                "a number in [0, 100] (0 = the weights alone)",
            ));
        }
        if self.draft_chars > 256 {
            return Err(Error::invalid(
                "draft_chars",
                self.draft_chars,
                "an integer in 0..=256 (0 = one call per character)",
            ));
        }
        if self.alternatives > 256 {
            return Err(Error::invalid(
                "alternatives",
                self.alternatives,
                "an integer in 0..=256",
            ));
        }
        Ok(())
    }
}

/// What to put in each `NextCharRequest`, derived from [`CharedParams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NodeQuery {
    /// `top_k`.
    pub top_k: u32,
    /// `max_hypotheses`: `Some(1)` for the published variant, else unset (the node default).
    pub max_hypotheses: Option<u32>,
    /// `lookahead`: `Some(false)` for the published variant, else unset (true).
    pub lookahead: Option<bool>,
}

/// One node's next-character distribution, as `NextCharDistribution` returned it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeCharDist {
    /// Listed characters and their probabilities, most likely first. A character listed twice has
    /// its probabilities added.
    pub chars: Vec<(char, f64)>,
    /// Probability that the answer ends here.
    pub eos: f64,
    /// Mass of all unlisted characters.
    pub residual: f64,
}

impl NodeCharDist {
    /// The entropy (nats) of this distribution with the listed characters, EOS and the residual as
    /// outcomes (the residual as one: a lower bound of the full distribution's entropy), after
    /// normalising their total to 1; 0 for an empty distribution.
    pub fn entropy(&self) -> f64 {
        entropy(self.chars.iter().map(|c| c.1).chain([self.eos, self.residual]))
    }
}

/// The entropy (nats) of non-negative masses normalised to sum 1 (0 when they sum to 0).
pub fn entropy(masses: impl Iterator<Item = f64> + Clone) -> f64 {
    let total: f64 = masses.clone().filter(|p| *p > 0.0).sum();
    if total <= 0.0 {
        return 0.0;
    }
    -masses
        .filter(|p| *p > 0.0)
        .map(|p| p / total * (p / total).ln())
        .sum::<f64>()
}

/// The next step of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum CharOutcome {
    /// Append this character.
    Char(char),
    /// End the answer.
    Eos,
}

/// An outcome and its mixed probability m.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Alternative {
    /// The outcome.
    pub outcome: CharOutcome,
    /// m(outcome).
    pub prob: f64,
}

/// One node's part in the chosen outcome.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NodeShare {
    /// The node.
    pub node: usize,
    /// Its weight, renormalised over the nodes that contributed this step.
    pub weight: f64,
    /// P_i(c*): its (normalised) probability of the chosen outcome.
    pub prob: f64,
    /// w_i P_i(c*) / m(c*); the shares of all contributing nodes sum to 1.
    pub share: f64,
}

/// Why a node's answer was left out of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SkipReason {
    /// A NaN, infinite or negative probability, or a total that is not > 0.
    Invalid,
    /// No mass on any listed character and no EOS mass (everything in the residual).
    NoMass,
    /// A second answer from the same node; the first one given is used.
    Duplicate,
}

/// A node answer left out of a step, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SkippedNode {
    /// The node.
    pub node: usize,
    /// Why.
    pub reason: SkipReason,
}

/// What one CharED step decided, for the caller and the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CharStep {
    /// The chosen outcome.
    pub chosen: CharOutcome,
    /// m(chosen), its mixed probability.
    pub prob: f64,
    /// Whether it was sampled (temperature > 0) rather than the argmax.
    pub sampled: bool,
    /// The most likely outcomes by m (the chosen one included), at most
    /// [`CharedParams::alternatives`], most likely first; outcomes with m = 0 are left out.
    pub alternatives: Vec<Alternative>,
    /// Each contributing node's share of the chosen outcome, ascending by node.
    pub shares: Vec<NodeShare>,
    /// Answers left out of this step.
    pub skipped: Vec<SkippedNode>,
    /// Σ m over all listed outcomes (1 minus the weighted residual).
    pub listed_mass: f64,
    /// The round of node calls that chose it, from 1 (per-character CharED: the step).
    pub round: u64,
    /// Whether it is a drafted character the mixture accepted.
    pub drafted: bool,
}

/// The CharED state of one request over `n` nodes (indices `0..n`): weights and the seeded sampler.
#[derive(Debug, Clone)]
pub struct CharEd {
    params: CharedParams,
    weights: Vec<f64>,
    rng: StdRng,
    steps: u64,
    rounds: u64,
    contributing_node_steps: u64,
    /// Per node, how far its own greedy choice followed the mixture in recent rounds (decayed).
    agreement: Vec<f64>,
}

/// A contributing node's normalised distribution over the step's outcomes.
struct Contributor {
    node: usize,
    weight: f64,
    probs: Vec<f64>,
}

impl CharEd {
    /// Starts a request over `nodes` nodes. Validates `params`; the weights, if given, must be one
    /// per node.
    pub fn new(params: CharedParams, nodes: usize) -> Result<Self> {
        params.validate()?;
        let weights = normalised_weights(params.weights.as_deref(), nodes)?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            weights,
            rng,
            steps: 0,
            rounds: 0,
            contributing_node_steps: 0,
            agreement: vec![0.0; nodes],
        })
    }

    /// The settings.
    pub fn params(&self) -> &CharedParams {
        &self.params
    }

    /// Node weights, normalised to sum 1 over all nodes.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The options of every `NextCharRequest` of this request.
    pub fn node_query(&self) -> NodeQuery {
        let published = self.params.published;
        NodeQuery {
            top_k: self.params.top_k,
            max_hypotheses: published.then_some(1),
            lookahead: published.then_some(false),
        }
    }

    /// Steps combined so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Rounds of node calls so far: one per [`CharEd::combine`], one per [`CharEd::accept_draft`].
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Sum over steps of the nodes that contributed a distribution.
    pub fn contributing_node_steps(&self) -> u64 {
        self.contributing_node_steps
    }

    /// Mixes the nodes' distributions and chooses the next outcome.
    ///
    /// - Each node's probabilities are divided by their total (chars + EOS + residual), so rounding
    ///   on the wire does not bias the mix. A node is skipped for the step when a value is NaN,
    ///   infinite or negative, when it has no mass on listed characters nor EOS, or when it answers
    ///   twice (see [`SkipReason`]).
    /// - m(c) = Σ_i w_i P_i(c), weights renormalised over the contributing nodes; unlisted characters
    ///   get 0 from a node (see the module docs).
    /// - Greedy (temperature 0): argmax m. **ours**, ties: a character beats EOS (the answer goes on),
    ///   and among characters the one listed first wins, reading the nodes' lists in ascending node
    ///   order (lists are most likely first).
    /// - Otherwise: p ∝ m^(1/T) over outcomes with m > 0, cut to the smallest most-likely set whose
    ///   mass reaches `top_p` (ties ordered as above), and sampled with the seeded RNG (one draw per
    ///   step).
    ///
    /// Errors: [`Error::UnknownNode`] for an index outside the ensemble; [`Error::NoDistribution`]
    /// when no node contributes (the sampler is not advanced then).
    pub fn combine(&mut self, dists: &[(usize, NodeCharDist)]) -> Result<CharStep> {
        self.rounds += 1;
        self.mix(dists, None)
    }

    /// The node that drafts the next speculative round among the `live` ones: the one whose own
    /// greedy choice followed the mixture furthest in recent rounds (each round's run from its start,
    /// averaged with halving weights), then the larger weight, then the lower index. None when no
    /// node is live.
    pub fn drafter(&self, live: &[bool]) -> Option<usize> {
        let key = |i: usize| (self.agreement.get(i).copied().unwrap_or(0.0), self.weights[i]);
        (0..self.weights.len().min(live.len()))
            .filter(|&i| live[i])
            .fold(None, |best: Option<usize>, i| match best {
                Some(b) if key(b) >= key(i) => Some(b),
                _ => Some(i),
            })
    }

    /// One round of speculative CharED: `positions[j]` holds the nodes' distributions after the
    /// first j characters of `draft` (j = 0..=draft.len(); a node may be missing from a position).
    /// Position by position the mixture chooses as [`CharEd::combine`] does, and the round goes on
    /// while it chooses the draft's character; it ends with the first outcome that differs from the
    /// draft (or the one after the whole draft, or EOS). Returns the steps taken, at least one.
    ///
    /// - Greedy: every step is argmax m, exactly as [`CharEd::combine`] would choose it after the
    ///   same characters; the answer is the one per-character CharED gives.
    /// - Sampled: the speculative acceptance test with the draft as a point mass q = 1 on its
    ///   character (drafts are the drafting node's greedy choice): accept it with probability p(d),
    ///   else draw from p without d, renormalised, which is max(0, p − q) normalised. Every
    ///   character is then distributed as p, the mixture after temperature and top-p.
    ///
    /// A position that no node answers ends the round with [`Error::NoDistribution`] when it is
    /// the first; later ones are not reached (the round stops before them).
    pub fn accept_draft(
        &mut self,
        positions: &[Vec<(usize, NodeCharDist)>],
        draft: &[char],
    ) -> Result<Vec<CharStep>> {
        self.begin_round();
        let steps = self.continue_round(positions, draft)?;
        self.note_agreement(positions, &steps);
        Ok(steps)
    }

    /// Starts a round whose steps [`CharEd::continue_round`] takes (a gated round takes its
    /// confident prefix from the lead alone, then the rest from every node).
    pub fn begin_round(&mut self) {
        self.rounds += 1;
    }

    /// The steps of the current round along `draft` from `positions` (relative to where the round
    /// stands): as [`CharEd::accept_draft`], without starting a round or noting agreement.
    pub fn continue_round(
        &mut self,
        positions: &[Vec<(usize, NodeCharDist)>],
        draft: &[char],
    ) -> Result<Vec<CharStep>> {
        let mut steps = Vec::new();
        for (j, dists) in positions.iter().enumerate().take(draft.len() + 1) {
            let want = draft.get(j).copied();
            let step = match self.mix(dists, want) {
                Ok(step) => step,
                Err(e) if steps.is_empty() => return Err(e),
                Err(_) => break,
            };
            let agreed = want.is_some_and(|d| step.chosen == CharOutcome::Char(d));
            steps.push(CharStep {
                drafted: agreed,
                ..step
            });
            if !agreed {
                break;
            }
        }
        Ok(steps)
    }

    /// Notes how far each node's own greedy choice ran along a round's steps (see
    /// [`CharEd::drafter`]).
    pub fn note_agreement(&mut self, positions: &[Vec<(usize, NodeCharDist)>], steps: &[CharStep]) {
        let mut runs = vec![0.0; self.agreement.len()];
        let mut alive: Vec<bool> = vec![true; self.agreement.len()];
        for (dists, step) in positions.iter().zip(steps) {
            for (node, d) in dists {
                if let (Some(run), Some(a)) = (runs.get_mut(*node), alive.get_mut(*node))
                    && *a
                {
                    *a = own_choice(d).map(|(o, _)| o) == Some(step.chosen);
                    if *a {
                        *run += 1.0;
                    }
                }
            }
        }
        for (a, r) in self.agreement.iter_mut().zip(runs) {
            *a = 0.5 * *a + 0.5 * r;
        }
    }

    /// The confidence gate (GaC's thresholded mode): how many leading positions of a round the lead
    /// node decides alone, given its distributions along its own greedy `draft` (positions
    /// 0..=draft.len()). Position j counts while the lead's own choice there has normalised
    /// probability >= `gate` (and, inside the draft, is the draft's character); the position after
    /// the draft counts too, so the result is in 0..=draft.len() + 1. 0 when the gate is off.
    pub fn confident_prefix(&self, lead: &[NodeCharDist], draft: &[char]) -> usize {
        let Some(gate) = self.params.gate else {
            return 0;
        };
        let mut k = 0;
        for (j, d) in lead.iter().enumerate().take(draft.len() + 1) {
            let Some((choice, p)) = own_choice(d) else { break };
            let total: f64 = d.chars.iter().map(|c| c.1).sum::<f64>() + d.eos + d.residual;
            let expected = draft.get(j).map(|&c| CharOutcome::Char(c));
            if !(total > 0.0 && p / total >= gate) || expected.is_some_and(|e| e != choice) {
                break;
            }
            k += 1;
        }
        k
    }

    fn mix(&mut self, dists: &[(usize, NodeCharDist)], draft: Option<char>) -> Result<CharStep> {
        let n = self.weights.len();
        if let Some(&(node, _)) = dists.iter().find(|(node, _)| *node >= n) {
            return Err(Error::UnknownNode { node, nodes: n });
        }
        let mut order: Vec<&(usize, NodeCharDist)> = dists.iter().collect();
        order.sort_by_key(|(node, _)| *node);

        // Outcomes in tie-break order: characters by first listing, EOS last.
        let mut outcomes: Vec<CharOutcome> = Vec::new();
        let mut index: HashMap<char, usize> = HashMap::new();
        let mut skipped = Vec::new();
        let mut accepted: Vec<(usize, &NodeCharDist, f64)> = Vec::new();
        for &(node, ref d) in order {
            let checked = if accepted.iter().any(|(a, _, _)| *a == node) {
                Err(SkipReason::Duplicate)
            } else {
                check_dist(d)
            };
            match checked {
                Ok(total) => {
                    for &(c, _) in &d.chars {
                        index.entry(c).or_insert_with(|| {
                            outcomes.push(CharOutcome::Char(c));
                            outcomes.len() - 1
                        });
                    }
                    accepted.push((node, d, total));
                }
                Err(reason) => skipped.push(SkippedNode { node, reason }),
            }
        }
        if accepted.is_empty() {
            return Err(Error::NoDistribution {
                skipped: skipped.len(),
            });
        }
        outcomes.push(CharOutcome::Eos);

        let beta = self.params.entropy_beta;
        let raw_weight = |node: usize, d: &NodeCharDist| {
            if beta == 0.0 {
                self.weights[node]
            } else {
                self.weights[node] * (-beta * d.entropy()).exp()
            }
        };
        let weight_total: f64 = accepted.iter().map(|(node, d, _)| raw_weight(*node, d)).sum();
        let contributors: Vec<Contributor> = accepted
            .iter()
            .map(|&(node, d, total)| {
                let mut probs = vec![0.0; outcomes.len()];
                for &(c, p) in &d.chars {
                    if let Some(&k) = index.get(&c) {
                        probs[k] += p / total;
                    }
                }
                probs[outcomes.len() - 1] = d.eos / total;
                Contributor {
                    node,
                    weight: raw_weight(node, d) / weight_total,
                    probs,
                }
            })
            .collect();
        let m: Vec<f64> = (0..outcomes.len())
            .map(|k| contributors.iter().map(|c| c.weight * c.probs[k]).sum())
            .collect();

        let temperature = self.params.temperature;
        let chosen = if temperature == 0.0 {
            argmax(&m)
        } else {
            let draft = draft.and_then(|d| index.get(&d).copied());
            self.sample(&m, temperature, draft)
        };
        let prob = m[chosen];
        let shares = contributors
            .iter()
            .map(|c| NodeShare {
                node: c.node,
                weight: c.weight,
                prob: c.probs[chosen],
                share: if prob > 0.0 {
                    c.weight * c.probs[chosen] / prob
                } else {
                    0.0
                },
            })
            .collect();
        let mut ranked: Vec<usize> = (0..m.len()).filter(|&k| m[k] > 0.0).collect();
        ranked.sort_by(|&a, &b| m[b].total_cmp(&m[a]));
        let alternatives = ranked
            .into_iter()
            .take(self.params.alternatives)
            .map(|k| Alternative {
                outcome: outcomes[k],
                prob: m[k],
            })
            .collect();

        self.steps += 1;
        self.contributing_node_steps += contributors.len() as u64;
        Ok(CharStep {
            chosen: outcomes[chosen],
            prob,
            sampled: temperature > 0.0,
            alternatives,
            shares,
            skipped,
            listed_mass: m.iter().sum(),
            round: self.rounds,
            drafted: false,
        })
    }

    /// Samples an index of `m` (some entry is > 0) with temperature and top-p; with a `draft`
    /// outcome, by the speculative acceptance test against it (see [`CharEd::accept_draft`]).
    fn sample(&mut self, m: &[f64], temperature: f64, draft: Option<usize>) -> usize {
        let mut idx: Vec<usize> = (0..m.len()).filter(|&k| m[k] > 0.0).collect();
        // Stable sort: ties keep the tie-break order of the outcomes.
        idx.sort_by(|&a, &b| m[b].total_cmp(&m[a]));
        let Some(&top) = idx.first() else { return argmax(m) };
        let log_max = m[top].ln();
        // exp((ln m - ln m_max) / T): the top outcome gets 1, nothing overflows or turns NaN.
        let p: Vec<f64> = idx
            .iter()
            .map(|&k| ((m[k].ln() - log_max) / temperature).exp())
            .collect();
        let total: f64 = p.iter().sum();
        let mut kept = 0;
        let mut mass = 0.0;
        while kept < p.len() {
            mass += p[kept];
            kept += 1;
            if mass >= self.params.top_p * total {
                break;
            }
        }
        let mut skip = None;
        if let Some(d) = draft {
            let pd = idx[..kept].iter().position(|&k| k == d).map_or(0.0, |j| p[j]);
            if self.rng.random::<f64>() * mass < pd {
                return d;
            }
            if pd > 0.0 {
                skip = Some(d);
                mass -= pd;
            }
        }
        let u = self.rng.random::<f64>() * mass;
        let mut acc = 0.0;
        let mut last = idx[0];
        for (j, &pj) in p.iter().take(kept).enumerate() {
            if Some(idx[j]) == skip {
                continue;
            }
            last = idx[j];
            acc += pj;
            if u < acc {
                return idx[j];
            }
        }
        last
    }
}

/// A node's own greedy choice: its most likely listed character (the first listed on ties), or EOS
/// when that is at least as likely.
fn own_choice(d: &NodeCharDist) -> Option<(CharOutcome, f64)> {
    let mut best: Option<(char, f64)> = None;
    for &(c, p) in &d.chars {
        if best.is_none_or(|(_, b)| p > b) {
            best = Some((c, p));
        }
    }
    match best {
        Some((c, p)) if p > d.eos => Some((CharOutcome::Char(c), p)),
        _ if d.eos > 0.0 => Some((CharOutcome::Eos, d.eos)),
        _ => None,
    }
}

/// Checks one node's distribution; returns its total mass (chars + EOS + residual).
fn check_dist(d: &NodeCharDist) -> std::result::Result<f64, SkipReason> {
    let values = d.chars.iter().map(|(_, p)| *p).chain([d.eos, d.residual]);
    if values.clone().any(|p| !p.is_finite() || p < 0.0) {
        return Err(SkipReason::Invalid);
    }
    let total: f64 = values.sum();
    if !(total.is_finite() && total > 0.0) {
        return Err(SkipReason::Invalid);
    }
    let listed: f64 = d.chars.iter().map(|(_, p)| *p).sum::<f64>() + d.eos;
    if listed <= 0.0 {
        return Err(SkipReason::NoMass);
    }
    Ok(total)
}

/// The first index of the largest value (the tie-break order is the order of `m`).
fn argmax(m: &[f64]) -> usize {
    let mut best = 0;
    for (k, &v) in m.iter().enumerate() {
        if v > m[best] {
            best = k;
        }
    }
    best
}
