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

#[cfg(test)]
mod tests;

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
}

/// The CharED state of one request over `n` nodes (indices `0..n`): weights and the seeded sampler.
#[derive(Debug, Clone)]
pub struct CharEd {
    params: CharedParams,
    weights: Vec<f64>,
    rng: StdRng,
    steps: u64,
    contributing_node_steps: u64,
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
            contributing_node_steps: 0,
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

        let weight_total: f64 = accepted.iter().map(|(node, _, _)| self.weights[*node]).sum();
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
                    weight: self.weights[node] / weight_total,
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
            self.sample(&m, temperature)
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
        })
    }

    /// Samples an index of `m` (some entry is > 0) with temperature and top-p.
    fn sample(&mut self, m: &[f64], temperature: f64) -> usize {
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
        let u = self.rng.random::<f64>() * mass;
        let mut acc = 0.0;
        for (j, &pj) in p.iter().take(kept).enumerate() {
            acc += pj;
            if u < acc {
                return idx[j];
            }
        }
        idx[kept.saturating_sub(1)]
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
