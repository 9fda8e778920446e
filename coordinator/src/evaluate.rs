//! Held-out evaluation sets (JSON Lines: `messages`, `answer`, `domain`), exact-match scoring, and the
//! per-domain × per-strategy accuracy table that `ensemble eval` prints and writes (JSON, Markdown).

use std::collections::BTreeMap;
use std::path::Path;

use ensemble_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// One chat message of an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// Text.
    pub content: String,
}

/// One evaluation item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalItem {
    /// The conversation (usually one user message).
    pub messages: Vec<EvalMessage>,
    /// The expected answer.
    pub answer: String,
    /// Its domain ("arithmetic", "atlas", "words", ...).
    pub domain: String,
}

impl EvalItem {
    /// The item's prompt for a `GenerateRequest`.
    pub fn prompt(&self) -> pb::Prompt {
        pb::Prompt {
            kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                messages: self
                    .messages
                    .iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            })),
        }
    }
}

/// Reads a JSON Lines set; errors name the line.
pub fn load_set(path: &Path) -> Result<Vec<EvalItem>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: EvalItem =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        out.push(item);
    }
    if out.is_empty() {
        return Err(format!("{}: no items", path.display()));
    }
    Ok(out)
}

/// Exact match after trimming surrounding whitespace.
pub fn exact_match(got: &str, expected: &str) -> bool {
    got.trim() == expected.trim()
}

/// Correct / total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Count {
    /// Exact matches.
    pub correct: u32,
    /// Items.
    pub total: u32,
}

impl Count {
    /// Accuracy in percent.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * f64::from(self.correct) / f64::from(self.total)
        }
    }
}

/// One item's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// The strategy.
    pub strategy: String,
    /// Item index in the set.
    pub item: usize,
    /// Its domain.
    pub domain: String,
    /// Expected answer.
    pub expected: String,
    /// What came back (or the error).
    pub got: String,
    /// Exact match.
    pub correct: bool,
    /// An error instead of an answer.
    pub error: bool,
    /// SpecFuse rounds / CharED characters.
    pub steps: u32,
    /// Mean active nodes per SpecFuse round.
    pub mean_active_nodes: f64,
    /// Waves of node calls that ran one after another.
    #[serde(default)]
    pub round_trips: u32,
    /// Characters written (answer and reasoning).
    #[serde(default)]
    pub chars: u32,
    /// Wall milliseconds of the request, as the client saw it.
    #[serde(default)]
    pub ms: f64,
    /// Calls made to nodes.
    #[serde(default)]
    pub node_calls: u32,
    /// Co-LLM: the base's deferrals to an assistant.
    #[serde(default)]
    pub deferrals: u32,
    /// Co-LLM: answer characters the assistants wrote.
    #[serde(default)]
    pub assisted_chars: u32,
}

/// Results of several strategies on one set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The set.
    pub set: String,
    /// Strategies in the order run.
    pub strategies: Vec<String>,
    /// Every outcome.
    pub outcomes: Vec<Outcome>,
}

impl Report {
    /// strategy → domain → count; the domain "all" sums the rest.
    pub fn table(&self) -> BTreeMap<String, BTreeMap<String, Count>> {
        let mut t: BTreeMap<String, BTreeMap<String, Count>> = BTreeMap::new();
        for o in &self.outcomes {
            let row = t.entry(o.strategy.clone()).or_default();
            for d in [o.domain.as_str(), "all"] {
                let c = row.entry(d.to_owned()).or_default();
                c.total += 1;
                c.correct += u32::from(o.correct);
            }
        }
        t
    }

    /// Domains in the set, sorted, then "all".
    pub fn domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self.outcomes.iter().map(|o| o.domain.clone()).collect();
        d.sort();
        d.dedup();
        d.push("all".into());
        d
    }

    /// The Markdown table: one row per domain, one column per strategy.
    pub fn markdown(&self) -> String {
        let t = self.table();
        let mut s = format!("| domain (n) | {} |\n|---|", self.strategies.join(" | "));
        s.push_str(&"---:|".repeat(self.strategies.len()));
        s.push('\n');
        for d in self.domains() {
            let n = t.values().next().and_then(|r| r.get(&d)).map_or(0, |c| c.total);
            s.push_str(&format!("| {d} ({n}) |"));
            for st in &self.strategies {
                let c = t.get(st).and_then(|r| r.get(&d)).copied().unwrap_or_default();
                s.push_str(&format!(" {:.1}% |", c.percent()));
            }
            s.push('\n');
        }
        let active: Vec<String> = self
            .strategies
            .iter()
            .map(|st| {
                let v: Vec<f64> = self
                    .outcomes
                    .iter()
                    .filter(|o| &o.strategy == st && o.mean_active_nodes > 0.0)
                    .map(|o| o.mean_active_nodes)
                    .collect();
                if v.is_empty() || st.starts_with("single:") {
                    "–".to_owned()
                } else {
                    format!("{:.2}", v.iter().sum::<f64>() / v.len() as f64)
                }
            })
            .collect();
        if active.iter().any(|a| a != "–") {
            s.push_str(&format!("| mean active nodes | {} |\n", active.join(" | ")));
        }
        // (round trips, node calls, characters, ms) per strategy, errors left out.
        let per_strategy = |f: &dyn Fn(f64, f64, f64, f64) -> String| -> Vec<String> {
            self.strategies
                .iter()
                .map(|st| {
                    let (mut trips, mut calls, mut chars, mut ms) = (0.0, 0.0, 0.0, 0.0);
                    for o in self.outcomes.iter().filter(|o| &o.strategy == st && !o.error) {
                        trips += f64::from(o.round_trips);
                        calls += f64::from(o.node_calls);
                        chars += f64::from(o.chars);
                        ms += o.ms;
                    }
                    if chars == 0.0 {
                        "–".to_owned()
                    } else {
                        f(trips, calls, chars, ms)
                    }
                })
                .collect()
        };
        let trips = per_strategy(&|t, _, c, _| format!("{:.3}", t / c));
        if trips.iter().any(|a| a != "–" && a != "0.000") {
            s.push_str(&format!(
                "| round trips per character | {} |\n",
                trips.join(" | ")
            ));
            let calls = per_strategy(&|_, n, c, _| format!("{:.3}", n / c));
            s.push_str(&format!("| node calls per character | {} |\n", calls.join(" | ")));
            let speed = per_strategy(&|_, _, c, ms| format!("{:.0}", c / (ms / 1e3).max(1e-9)));
            s.push_str(&format!("| characters per second | {} |\n", speed.join(" | ")));
        }
        let assisted: Vec<String> = self
            .strategies
            .iter()
            .map(|st| {
                let (mut n, mut a, mut c) = (0u32, 0u32, 0u32);
                for o in self.outcomes.iter().filter(|o| &o.strategy == st && !o.error) {
                    (n, a, c) = (n + o.deferrals, a + o.assisted_chars, c + o.chars);
                }
                if n == 0 {
                    "–".to_owned()
                } else {
                    format!("{n} · {:.1}%", 100.0 * f64::from(a) / f64::from(c.max(1)))
                }
            })
            .collect();
        if assisted.iter().any(|a| a != "–") {
            s.push_str(&format!(
                "| deferrals · characters by assistants | {} |\n",
                assisted.join(" | ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(strategy: &str, domain: &str, correct: bool) -> Outcome {
        Outcome {
            strategy: strategy.into(),
            item: 0,
            domain: domain.into(),
            expected: "x".into(),
            got: "y".into(),
            correct,
            error: false,
            steps: 1,
            mean_active_nodes: 0.0,
            round_trips: 2,
            chars: 4,
            ms: 10.0,
            node_calls: 6,
            deferrals: u32::from(strategy == "b"),
            assisted_chars: 1,
        }
    }

    #[test]
    fn table_counts_per_domain_and_all() {
        let r = Report {
            set: "s".into(),
            strategies: vec!["a".into(), "b".into()],
            outcomes: vec![
                outcome("a", "atlas", true),
                outcome("a", "words", false),
                outcome("b", "atlas", true),
                outcome("b", "words", true),
            ],
        };
        let t = r.table();
        assert_eq!(t["a"]["all"], Count { correct: 1, total: 2 });
        assert_eq!(t["b"]["words"], Count { correct: 1, total: 1 });
        let md = r.markdown();
        assert!(md.contains("| all (2) | 50.0% | 100.0% |"), "{md}");
        assert!(
            md.contains("| round trips per character | 0.500 | 0.500 |"),
            "{md}"
        );
        assert!(
            md.contains("| node calls per character | 1.500 | 1.500 |"),
            "{md}"
        );
        assert!(md.contains("| characters per second | 400 | 400 |"), "{md}");
        assert!(
            md.contains("| deferrals · characters by assistants | – | 2 · 25.0% |"),
            "{md}"
        );
        assert!(exact_match(" 405\n", "405"));
        assert!(!exact_match("4050", "405"));
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("evalset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("bad.jsonl");
        std::fs::write(
            &p,
            "{\"messages\":[],\"answer\":\"1\",\"domain\":\"d\"}\nnot json\n",
        )
        .expect("write");
        let e = load_set(&p).expect_err("bad");
        assert!(e.contains(":2:"), "{e}");
    }
}
