//! SpecFuse's PROPOSE output: cutting drafts to word boundaries, dropping empty ones and merging
//! identical texts into distinct candidates.

use serde::Serialize;

/// One node's raw draft, as `ProposeSegment` returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DraftText {
    /// The drafted text (continues the answer).
    pub text: String,
    /// Whether the draft ended the answer: the node produced EOS or a stop string
    /// (`FINISH_REASON_EOS` / `FINISH_REASON_STOP`); `false` for `FINISH_REASON_LENGTH`.
    pub finished_by_eos_or_stop: bool,
}

impl DraftText {
    /// A draft that stopped at the length limit (may end mid-word).
    pub fn unfinished(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            finished_by_eos_or_stop: false,
        }
    }

    /// A draft that ended the answer (EOS or a stop string).
    pub fn finished(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            finished_by_eos_or_stop: true,
        }
    }
}

/// A distinct candidate text and the nodes that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// The text, after the word-boundary cut.
    pub text: String,
    /// Nodes that proposed exactly this text, ascending. Never empty.
    pub proposers: Vec<usize>,
    /// Whether the answer ends after this text: **ours**, true when *any* proposer's draft ended the
    /// answer (merging an agreeing draft does not override a proposer's decision to stop).
    pub ends_answer: bool,
}

/// Why a node's draft is not among the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DropReason {
    /// The draft was empty. `ended_answer`: the node produced EOS or a stop string at once.
    Empty {
        /// Whether the empty draft ended the answer.
        ended_answer: bool,
    },
    /// The node is not active in this request (it exited or failed earlier).
    Inactive,
    /// The node index is outside the ensemble (a caller bug; the draft is ignored).
    UnknownNode,
    /// A second draft from the same node; the first one given is kept.
    Duplicate,
}

/// A draft that was dropped, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DroppedDraft {
    /// The node that proposed it.
    pub node: usize,
    /// Why it was dropped.
    pub reason: DropReason,
}

/// A draft that was cut back to a word boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CutDraft {
    /// The node that proposed it.
    pub node: usize,
    /// The text removed from the end of the draft (the partial word and the whitespace before it).
    pub removed: String,
}

/// The distinct candidates of one round, ready to be sent to the verifiers.
///
/// Built by [`crate::SpecFuse::prepare_drafts`]; candidates are ordered by their lowest proposer, so
/// a lower candidate index always means a lower node index.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drafts {
    pub(crate) nodes: usize,
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) node_candidate: Vec<Option<usize>>,
    pub(crate) cuts: Vec<CutDraft>,
    pub(crate) dropped: Vec<DroppedDraft>,
}

impl Drafts {
    /// The distinct candidates, ordered by lowest proposer.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The candidate texts, in order: the `candidates` field of every `ScoreRequest` this round.
    pub fn texts(&self) -> Vec<&str> {
        self.candidates.iter().map(|c| c.text.as_str()).collect()
    }

    /// Whether there is no candidate at all.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The index of the candidate `node` proposed, if any.
    pub fn candidate_of(&self, node: usize) -> Option<usize> {
        self.node_candidate.get(node).copied().flatten()
    }

    /// Drafts that were cut back to a word boundary.
    pub fn cuts(&self) -> &[CutDraft] {
        &self.cuts
    }

    /// Drafts that were dropped, and why.
    pub fn dropped(&self) -> &[DroppedDraft] {
        &self.dropped
    }

    /// Nodes whose empty draft ended the answer (EOS or a stop string at once), ascending.
    pub fn ended_empty(&self) -> Vec<usize> {
        let mut nodes: Vec<usize> = self
            .dropped
            .iter()
            .filter(|d| d.reason == DropReason::Empty { ended_answer: true })
            .map(|d| d.node)
            .collect();
        nodes.sort_unstable();
        nodes
    }
}

/// Whether a draft ending in `c` may end in the middle of a word: letters and digits of any script,
/// `_`, apostrophes and hyphens.
fn continues_word(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '\'' | '’' | '-')
}

/// Cuts a draft that may end mid-word back to its last word boundary.
///
/// A draft "may end mid-word" when its last character is a letter, digit, `_`, apostrophe or hyphen
/// (the next token could extend the word). Words are separated by whitespace: the trailing run of
/// non-whitespace characters is removed, then the whitespace before it, so the next round starts
/// with " word" as byte-level BPE tokenizers prefer. Returns `(kept, removed)`.
///
/// **ours**: when the cut would leave nothing but whitespace (the whole draft is one partial word, e.g.
/// a long URL or a script without spaces), the draft is kept whole: dropping it would stall the answer.
pub(crate) fn cut_to_word_boundary(text: &str) -> (&str, &str) {
    match text.chars().next_back() {
        Some(last) if continues_word(last) => {}
        _ => return (text, ""),
    }
    let word_start = text.rfind(char::is_whitespace).map_or(0, |i| {
        // `i` is the start of the whitespace character; the word begins after it.
        i + text[i..].chars().next().map_or(0, char::len_utf8)
    });
    let kept = text[..word_start].trim_end();
    if kept.trim().is_empty() {
        (text, "")
    } else {
        (kept, &text[kept.len()..])
    }
}

/// Builds the round's [`Drafts`]; see [`crate::SpecFuse::prepare_drafts`].
pub(crate) fn build(raw: Vec<(usize, DraftText)>, active: &[bool], cut: bool) -> Drafts {
    let nodes = active.len();
    let mut raw = raw;
    // Stable: among duplicates of one node, the first given stays first.
    raw.sort_by_key(|(node, _)| *node);
    let mut drafts = Drafts {
        nodes,
        candidates: Vec::new(),
        node_candidate: vec![None; nodes],
        cuts: Vec::new(),
        dropped: Vec::new(),
    };
    let mut seen = vec![false; nodes];
    for (node, draft) in raw {
        let reason = match active.get(node) {
            None => Some(DropReason::UnknownNode),
            Some(false) => Some(DropReason::Inactive),
            Some(true) if seen[node] => Some(DropReason::Duplicate),
            Some(true) => None,
        };
        if let Some(reason) = reason {
            drafts.dropped.push(DroppedDraft { node, reason });
            continue;
        }
        seen[node] = true;
        let ends = draft.finished_by_eos_or_stop;
        let mut text = draft.text;
        if cut && !ends {
            let (kept, removed) = cut_to_word_boundary(&text);
            if !removed.is_empty() {
                drafts.cuts.push(CutDraft {
                    node,
                    removed: removed.to_owned(),
                });
                text.truncate(kept.len());
            }
        }
        if text.is_empty() {
            drafts.dropped.push(DroppedDraft {
                node,
                reason: DropReason::Empty { ended_answer: ends },
            });
            continue;
        }
        let index = match drafts.candidates.iter().position(|c| c.text == text) {
            Some(i) => {
                let c = &mut drafts.candidates[i];
                c.proposers.push(node);
                c.ends_answer |= ends;
                i
            }
            None => {
                drafts.candidates.push(Candidate {
                    text,
                    proposers: vec![node],
                    ends_answer: ends,
                });
                drafts.candidates.len() - 1
            }
        };
        drafts.node_candidate[node] = Some(index);
    }
    drafts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_rules() {
        assert_eq!(cut_to_word_boundary("Hello, wor"), ("Hello,", " wor"));
        assert_eq!(cut_to_word_boundary("Hello world."), ("Hello world.", ""));
        assert_eq!(cut_to_word_boundary("Hello world "), ("Hello world ", ""));
        assert_eq!(cut_to_word_boundary("one two\n\nthr"), ("one two", "\n\nthr"));
        // Words are whitespace-separated: contractions, numbers and hyphenated words go whole.
        assert_eq!(cut_to_word_boundary("I don't"), ("I", " don't"));
        assert_eq!(cut_to_word_boundary("pi is 3.14"), ("pi is", " 3.14"));
        assert_eq!(cut_to_word_boundary("a well-"), ("a", " well-"));
        // No boundary at all: kept whole.
        assert_eq!(cut_to_word_boundary("Hel"), ("Hel", ""));
        assert_eq!(cut_to_word_boundary("  wor"), ("  wor", ""));
        assert_eq!(cut_to_word_boundary("你好世界"), ("你好世界", ""));
        assert_eq!(cut_to_word_boundary(""), ("", ""));
        // Multi-byte whitespace and letters.
        assert_eq!(cut_to_word_boundary("café\u{3000}naïv"), ("café", "\u{3000}naïv"));
    }
}
