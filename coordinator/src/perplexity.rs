//! Tokenizer-independent likelihood: bits per character (and per UTF-8 byte) of a text under every
//! member and under their CharED mixture, and mixture weights fitted to a text.
//!
//! Members tokenize differently, so their token perplexities cannot be compared; the probability of
//! each *character* can. Every document is teacher-forced through every member's session with
//! `NextCharDistributions` and `observed` set: one call prices a chunk of characters exactly (the
//! node sums the token paths that spell each one; no top-k floor). The mixture CharED decodes with is
//! `p(c) = Σ_i w_i p_i(c)`, so its bits per character follow from the members' per-character
//! probabilities and any weights, and [`Perplexity::fit_weights`] finds the weights that minimise it
//! (EM for mixture weights: deterministic, each step never increases the bits).
//!
//! A *per-context* mixture lets each member's weight follow its own confidence at each character:
//! `π_i ∝ w_i · exp(−β · H_i)`, `H_i` the entropy of the member's next-character distribution there
//! (its listed characters, EOS and the residual as one outcome; what CharED's `entropy_beta` uses).
//! [`Perplexity::fit_context`] fits `w` and `β` together (a grid over β, the weights by a damped
//! fixed-point of the likelihood's gradient for each; deterministic).
//!
//! A document longer than a member's context is scored in sliding windows: when the node refuses a
//! chunk as too long, the member starts a new session whose context is the later half of the current
//! window (the characters already scored are context only; none is scored twice), and goes on.

use crate::core::Coordinator;
use crate::error::{Error, Result};
use ensemble_proto::v1 as pb;

/// Characters priced per call.
const CHUNK_CHARS: usize = 64;

/// Probabilities below this count as this (a character a member gives no mass at all would make its
/// bits infinite; reported separately as `floored`).
const FLOOR: f64 = 1e-12;

/// One member's probabilities of every character, documents one after another.
#[derive(Debug, Clone)]
pub struct MemberRun {
    /// The member's name.
    pub name: String,
    /// P(character | everything before it in its document), in text order; NaN where the member
    /// cannot price it (the first character of a document under a tokenizer without BOS, which
    /// cannot start from an empty context).
    pub probs: Vec<f64>,
    /// The entropy (nats) of the member's listed next-character distribution at each character
    /// (NaN where `probs` is).
    pub entropy: Vec<f64>,
    /// `NextCharDistributions` calls made.
    pub calls: u64,
    /// Forward passes the member's node reported.
    pub forward_passes: u64,
    /// Positions the member's node ran through its model.
    pub computed_positions: u64,
    /// Windows started after the first of a document (context overflows).
    pub slides: u64,
}

/// The characters of a set of documents priced by every member.
#[derive(Debug, Clone)]
pub struct Perplexity {
    /// Characters of each document.
    pub doc_chars: Vec<usize>,
    /// UTF-8 bytes of each document.
    pub doc_bytes: Vec<usize>,
    /// UTF-8 bytes of each character, documents one after another.
    pub char_bytes: Vec<u8>,
    /// One entry per member, in configuration order.
    pub members: Vec<MemberRun>,
    /// The configured member weights (normalised).
    pub weights: Vec<f64>,
    /// The configured per-context β (CharED's `entropy_beta`; 0: the weights alone).
    pub entropy_beta: f64,
}

/// The β grid [`Perplexity::fit_context`] searches: 0 to 4 by 0.1.
const BETA_GRID: std::ops::RangeInclusive<u32> = 0..=40;

/// Bits per character and per byte of one model or mixture over a set of documents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bits {
    /// Bits per character.
    pub per_char: f64,
    /// Bits per UTF-8 byte.
    pub per_byte: f64,
    /// Characters whose probability was below [`FLOOR`].
    pub floored: usize,
    /// Characters scored (those some member cannot price are left out for every row, so that rows
    /// compare the same characters).
    pub chars: usize,
}

impl Perplexity {
    /// Character ranges of the documents selected by `pick(document index)`.
    fn ranges(&self, pick: &dyn Fn(usize) -> bool) -> Vec<std::ops::Range<usize>> {
        let mut at = 0;
        let mut out = Vec::new();
        for (d, &n) in self.doc_chars.iter().enumerate() {
            if pick(d) {
                out.push(at..at + n);
            }
            at += n;
        }
        out
    }

    /// Whether every member priced character `i`.
    fn scored(&self, i: usize) -> bool {
        self.members.iter().all(|m| !m.probs[i].is_nan())
    }

    /// Bits of the mixture with `weights` (one per member; a one-hot vector is that member alone) over
    /// the documents `pick` selects.
    pub fn bits(&self, weights: &[f64], pick: &dyn Fn(usize) -> bool) -> Bits {
        self.bits_in_context(weights, 0.0, pick)
    }

    /// Member weights at character `i` of a per-context mixture (`weights`, `beta`), normalised.
    fn context_weights(&self, weights: &[f64], beta: f64, i: usize, out: &mut [f64]) {
        for ((o, m), w) in out.iter_mut().zip(&self.members).zip(weights) {
            *o = if beta == 0.0 {
                *w
            } else {
                w * (-beta * m.entropy[i]).exp()
            };
        }
        let total: f64 = out.iter().sum();
        if total > 0.0 {
            out.iter_mut().for_each(|o| *o /= total);
        }
    }

    /// Bits of the per-context mixture: at each character member i weighs `weights[i] · exp(−beta ·
    /// H_i)`, renormalised (`beta` 0: [`Perplexity::bits`]).
    pub fn bits_in_context(&self, weights: &[f64], beta: f64, pick: &dyn Fn(usize) -> bool) -> Bits {
        let (mut nats, mut chars, mut bytes, mut floored) = (0.0, 0usize, 0usize, 0usize);
        let mut pi = vec![0.0; self.members.len()];
        for r in self.ranges(pick) {
            for i in r.filter(|&i| self.scored(i)) {
                self.context_weights(weights, beta, i, &mut pi);
                let p: f64 = self.members.iter().zip(&pi).map(|(m, w)| w * m.probs[i]).sum();
                if p < FLOOR {
                    floored += 1;
                }
                nats -= p.max(FLOOR).ln();
                chars += 1;
                bytes += usize::from(self.char_bytes[i]);
            }
        }
        let bits = nats / std::f64::consts::LN_2;
        Bits {
            per_char: if chars == 0 { 0.0 } else { bits / chars as f64 },
            per_byte: if bytes == 0 { 0.0 } else { bits / bytes as f64 },
            floored,
            chars,
        }
    }

    /// Member `m` alone.
    pub fn member_bits(&self, m: usize, pick: &dyn Fn(usize) -> bool) -> Bits {
        let one_hot: Vec<f64> = (0..self.members.len())
            .map(|i| f64::from(u8::from(i == m)))
            .collect();
        self.bits(&one_hot, pick)
    }

    /// The mixture weights that minimise bits per character over the documents `pick` selects
    /// (EM, from uniform, until no weight moves by 1e-12 or 10,000 steps; deterministic).
    pub fn fit_weights(&self, pick: &dyn Fn(usize) -> bool) -> Vec<f64> {
        let k = self.members.len();
        let mut w = vec![1.0 / k as f64; k];
        let ranges: Vec<Vec<usize>> = self
            .ranges(pick)
            .into_iter()
            .map(|r| r.filter(|&i| self.scored(i)).collect())
            .collect();
        let n: usize = ranges.iter().map(Vec::len).sum();
        if k == 0 || n == 0 {
            return w;
        }
        for _ in 0..10_000 {
            let mut acc = vec![0.0; k];
            for r in &ranges {
                for &i in r {
                    let mix: f64 = (0..k).map(|j| w[j] * self.members[j].probs[i]).sum::<f64>();
                    if mix <= 0.0 {
                        continue;
                    }
                    for j in 0..k {
                        acc[j] += w[j] * self.members[j].probs[i] / mix;
                    }
                }
            }
            // Characters no member gives any mass say nothing about the weights: renormalise.
            let sum: f64 = acc.iter().sum();
            if sum <= 0.0 {
                break;
            }
            let next: Vec<f64> = acc.iter().map(|a| a / sum).collect();
            let moved = next
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            w = next;
            if moved < 1e-12 {
                break;
            }
        }
        w
    }

    /// The per-context mixture (weights, β) with the fewest bits per character over the documents
    /// `pick` selects: β from 0 to 4 by 0.1, for each the weights by the damped fixed point
    /// `w_i ← w_i · (Σ_t r_i(t) / Σ_t π_i(t))^η` (r the posterior, π the context weights; at β = 0 it
    /// is EM), each step kept only if it lowers the bits (η halves otherwise). Deterministic; never
    /// worse than [`Perplexity::fit_weights`] (β = 0 is on the grid).
    pub fn fit_context(&self, pick: &dyn Fn(usize) -> bool) -> (Vec<f64>, f64) {
        let k = self.members.len();
        let idx: Vec<usize> = self
            .ranges(pick)
            .into_iter()
            .flat_map(|r| r.filter(|&i| self.scored(i)))
            .collect();
        let start = self.fit_weights(pick);
        if k < 2 || idx.is_empty() {
            return (start, 0.0);
        }
        // exp(−β·H) of every member at every character, computed once per β (the same factors as
        // [`Perplexity::context_weights`]).
        let gates = |beta: f64| -> Vec<f64> {
            idx.iter()
                .flat_map(|&i| self.members.iter().map(move |m| (-beta * m.entropy[i]).exp()))
                .collect()
        };
        let weigh = |w: &[f64], g: &[f64], t: usize, pi: &mut [f64]| {
            for (j, p) in pi.iter_mut().enumerate() {
                *p = w[j] * g[t * k + j];
            }
            let total: f64 = pi.iter().sum();
            if total > 0.0 {
                pi.iter_mut().for_each(|p| *p /= total);
            }
        };
        let nats = |w: &[f64], g: &[f64]| -> f64 {
            let mut pi = vec![0.0; k];
            idx.iter()
                .enumerate()
                .map(|(t, &i)| {
                    weigh(w, g, t, &mut pi);
                    let p: f64 = (0..k).map(|j| pi[j] * self.members[j].probs[i]).sum();
                    -p.max(FLOOR).ln()
                })
                .sum()
        };
        let mut best = (start.clone(), 0.0, nats(&start, &gates(0.0)));
        for step in BETA_GRID.skip(1) {
            let beta = f64::from(step) / 10.0;
            let g = gates(beta);
            // From the EM weights, none below 1e-3: a multiplicative step never moves a weight off 0,
            // and a member EM drops may still help where it is sure.
            let floor: Vec<f64> = start.iter().map(|w| w.max(1e-3)).collect();
            let total: f64 = floor.iter().sum();
            let mut w: Vec<f64> = floor.iter().map(|x| x / total).collect();
            let mut cur = nats(&w, &g);
            let mut eta = 1.0;
            let mut pi = vec![0.0; k];
            for _ in 0..200 {
                let (mut r_sum, mut pi_sum) = (vec![0.0; k], vec![0.0; k]);
                for (t, &i) in idx.iter().enumerate() {
                    weigh(&w, &g, t, &mut pi);
                    let p: f64 = (0..k).map(|j| pi[j] * self.members[j].probs[i]).sum();
                    if p <= 0.0 {
                        continue;
                    }
                    for j in 0..k {
                        r_sum[j] += pi[j] * self.members[j].probs[i] / p;
                        pi_sum[j] += pi[j];
                    }
                }
                let mut next: Vec<f64> = (0..k)
                    .map(|j| {
                        if pi_sum[j] > 0.0 {
                            w[j] * (r_sum[j] / pi_sum[j]).powf(eta)
                        } else {
                            w[j]
                        }
                    })
                    .collect();
                let total: f64 = next.iter().sum();
                next.iter_mut().for_each(|x| *x /= total);
                let n = nats(&next, &g);
                if n < cur {
                    let moved = next
                        .iter()
                        .zip(&w)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    (w, cur) = (next, n);
                    if moved < 1e-10 {
                        break;
                    }
                } else {
                    eta /= 2.0;
                    if eta < 1e-3 {
                        break;
                    }
                }
            }
            if cur < best.2 {
                best = (w, beta, cur);
            }
        }
        (best.0, best.1)
    }
}

impl Perplexity {
    fn row(&self, name: &str, bits: Bits, weights: &[f64], member: Option<&MemberRun>) -> pb::ModelBits {
        let total: f64 = weights.iter().sum();
        pb::ModelBits {
            name: name.to_owned(),
            bits_per_char: bits.per_char,
            bits_per_byte: bits.per_byte,
            floored: bits.floored as u32,
            weights: if member.is_some() {
                vec![]
            } else {
                weights.iter().map(|w| w / total).collect()
            },
            calls: member.map_or(0, |m| m.calls),
            windows_slid: member.map_or(0, |m| m.slides),
            entropy_beta: 0.0,
            forward_passes: member.map_or(0, |m| m.forward_passes),
            computed_positions: member.map_or(0, |m| m.computed_positions),
        }
    }

    /// The members alone and the configured mixture over every document; with `fit`, the same, the
    /// fitted mixture and the fitted per-context mixture on the odd-numbered documents, fitted on the
    /// even-numbered ones.
    pub fn report(&self, fit: bool) -> pb::PerplexityResponse {
        let rows = |pick: &dyn Fn(usize) -> bool| -> Vec<pb::ModelBits> {
            let mut rows: Vec<pb::ModelBits> = self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| self.row(&m.name, self.member_bits(i, pick), &[], Some(m)))
                .collect();
            let bits = self.bits_in_context(&self.weights, self.entropy_beta, pick);
            rows.push(pb::ModelBits {
                entropy_beta: self.entropy_beta,
                ..self.row("mixture", bits, &self.weights, None)
            });
            rows
        };
        let all = |_: usize| true;
        let odd = |d: usize| d % 2 == 1;
        let even = |d: usize| d.is_multiple_of(2);
        let mut held_out = Vec::new();
        if fit {
            held_out = rows(&odd);
            let w = self.fit_weights(&even);
            held_out.push(self.row("fitted mixture", self.bits(&w, &odd), &w, None));
            let (w, beta) = self.fit_context(&even);
            held_out.push(pb::ModelBits {
                entropy_beta: beta,
                ..self.row(
                    "fitted per-context mixture",
                    self.bits_in_context(&w, beta, &odd),
                    &w,
                    None,
                )
            });
        }
        pb::PerplexityResponse {
            chars: self.bits(&self.weights, &all).chars as u64,
            bytes: self.doc_bytes.iter().sum::<usize>() as u64,
            rows: rows(&all),
            held_out,
            held_out_chars: if fit {
                self.bits(&self.weights, &odd).chars as u64
            } else {
                0
            },
        }
    }
}

/// Prices every character of every document under every member of `coordinator`.
/// `progress(documents done)` is called after each document.
pub async fn measure(
    coordinator: &Coordinator,
    docs: &[String],
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<Perplexity> {
    let weights: Vec<f64> = coordinator.member_configs().map(|(c, _)| c.weight).collect();
    let total: f64 = weights.iter().sum();
    let chared = &coordinator.settings().chared;
    let raw = pb::Prompt {
        kind: Some(pb::prompt::Kind::Raw(String::new())),
    };
    let mut members: Vec<MemberRun> = coordinator
        .node_names()
        .iter()
        .map(|n| MemberRun {
            name: n.clone(),
            probs: Vec::new(),
            entropy: Vec::new(),
            calls: 0,
            forward_passes: 0,
            computed_positions: 0,
            slides: 0,
        })
        .collect();
    for (d, doc) in docs.iter().enumerate() {
        let session = format!("perplexity-{}-{d}", std::process::id());
        let mut clients = coordinator.clients(&session, &raw, None);
        let chars: Vec<char> = doc.chars().collect();
        let runs = clients.iter_mut().map(|c| {
            let (session, chars, raw) = (&session, &chars, raw.clone());
            async move {
                let r = score_doc(c, session, raw, chars, chared.top_k).await;
                c.close().await;
                r.map(|(probs, work)| (probs, work, c.calls().2))
            }
        });
        for (m, r) in futures::future::join_all(runs).await.into_iter().enumerate() {
            let (probs, work, calls) = r?;
            members[m].probs.extend(probs.iter().map(|p| p.0));
            members[m].entropy.extend(probs.iter().map(|p| p.1));
            members[m].calls += calls;
            members[m].slides += work.slides;
            members[m].forward_passes += work.forward_passes;
            members[m].computed_positions += work.computed_positions;
        }
        progress(d + 1);
    }
    Ok(Perplexity {
        doc_chars: docs.iter().map(|d| d.chars().count()).collect(),
        doc_bytes: docs.iter().map(String::len).collect(),
        char_bytes: docs
            .iter()
            .flat_map(|d| d.chars())
            .map(|c| c.len_utf8() as u8)
            .collect(),
        members,
        weights: weights.iter().map(|w| w / total).collect(),
        entropy_beta: chared.entropy_beta,
    })
}

/// Whether a node refused an empty context (its tokenizer has no BOS token to start from).
fn needs_context(e: &Error) -> bool {
    matches!(e, Error::Node { code: tonic::Code::InvalidArgument, message, .. } if message.contains("empty context"))
}

/// Whether a node refused a call because the context would pass its limit.
fn too_long(e: &Error) -> bool {
    matches!(e, Error::Node { code: tonic::Code::InvalidArgument, message, .. } if message.contains("context too long"))
}

/// What pricing a document cost a member.
#[derive(Debug, Default)]
struct Work {
    slides: u64,
    forward_passes: u64,
    computed_positions: u64,
}

/// One document through one member, whose client has begun `session` with `prompt`:
/// ((probability, entropy) of each character, the work).
async fn score_doc(
    c: &mut crate::node_client::NodeClient,
    session: &str,
    prompt: pb::Prompt,
    chars: &[char],
    top_k: u32,
) -> Result<(Vec<(f64, f64)>, Work)> {
    let (mut probs, mut work) = (Vec::with_capacity(chars.len()), Work::default());
    let (mut start, mut at, mut chunk) = (0usize, 0usize, CHUNK_CHARS);
    while at < chars.len() {
        let end = (at + chunk).min(chars.len());
        let text: String = chars[at..end].iter().collect();
        match c.observed_chars(&text, top_k).await {
            Ok((p, usage)) => {
                probs.extend(p);
                work.forward_passes += u64::from(usage.forward_passes);
                work.computed_positions += u64::from(usage.computed_positions);
                c.accept(&text);
                at = end;
                chunk = CHUNK_CHARS;
            }
            Err(e) if at == 0 && needs_context(&e) && !chars.is_empty() => {
                // No BOS: the first character is context only, unpriced.
                probs.push((f64::NAN, f64::NAN));
                c.accept(&chars[0].to_string());
                at = 1;
            }
            Err(e) if too_long(&e) => {
                if at > start + 1 {
                    // Slide: keep the later half of this window as context only (at least one
                    // character: a tokenizer without BOS cannot start from nothing).
                    start = (at - (at - start) / 2).min(at - 1);
                    work.slides += 1;
                    c.begin(format!("{session}-{}", work.slides), prompt.clone());
                    c.accept(&chars[start..at].iter().collect::<String>());
                } else if chunk > 1 {
                    chunk /= 2;
                } else {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((probs, work))
}
