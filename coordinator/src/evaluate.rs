//! Held-out evaluation sets (JSON Lines: `messages`, `answer`, `domain`), exact-match scoring, and the
//! per-domain × per-strategy accuracy table that `ensemble eval` prints and writes (JSON, Markdown, and
//! an SVG bar chart).

use std::collections::BTreeMap;
use std::path::Path;

use ensemble_proto::v1 as pb;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
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

    /// A grouped bar chart of the table as SVG: one group per domain (then "all"), one bar per
    /// strategy (colours in the legend), exact-match accuracy in % on a 0–100 axis. The text is SVG
    /// `<text>`, so the viewer's fonts draw it.
    pub fn chart_svg(&self) -> Result<String, String> {
        let t = self.table();
        let domains = self.domains();
        let n_strategies = self.strategies.len().max(1);
        let longest = self
            .strategies
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0);
        let legend_w = (40 + 7 * longest).clamp(120, 320) as u32;
        let width = (160 + domains.len() * (40 + 24 * n_strategies)).clamp(640, 1600) as u32 + legend_w;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, 440)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let (plot, legend) = root.split_horizontally(width - legend_w);
            let x_labels: Vec<String> = domains
                .iter()
                .map(|d| {
                    let n = t.values().next().and_then(|r| r.get(d)).map_or(0, |c| c.total);
                    format!("{d} ({n})")
                })
                .collect();
            // The title, then room for the values on top of 100% bars.
            let plot = plot
                .titled(
                    &format!("{}: exact match by domain", self.set),
                    ("sans-serif", 20),
                )
                .map_err(|e| e.to_string())?
                .margin(18, 12, 12, 12);
            let mut chart = ChartBuilder::on(&plot)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(Slots(domains.len()), 0.0..100.0)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(TRANSPARENT)
                .x_desc("domain (items)")
                .y_desc("exact match (%)")
                .x_label_formatter(&|x| x_labels.get(*x as usize).cloned().unwrap_or_default())
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()
                .map_err(|e| e.to_string())?;
            // Each group takes 80% of its slot; bars wider than ~28 px get their value on top.
            let bar = 0.8 / n_strategies as f64;
            let bar_px = f64::from(width - legend_w - 76) / domains.len() as f64 * bar;
            for (k, st) in self.strategies.iter().enumerate() {
                let colour = palette(k);
                let bars = domains.iter().enumerate().map(|(i, d)| {
                    let pct = t
                        .get(st)
                        .and_then(|r| r.get(d))
                        .copied()
                        .unwrap_or_default()
                        .percent();
                    let x0 = i as f64 + 0.1 + bar * k as f64;
                    (x0, pct)
                });
                chart
                    .draw_series(
                        bars.clone()
                            .map(|(x0, pct)| Rectangle::new([(x0, 0.0), (x0 + bar, pct)], colour.filled())),
                    )
                    .map_err(|e| e.to_string())?;
                if bar_px >= 28.0 {
                    let style = TextStyle::from(("sans-serif", 11)).pos(Pos::new(HPos::Center, VPos::Bottom));
                    chart
                        .draw_series(bars.map(|(x0, pct)| {
                            Text::new(format!("{pct:.0}"), (x0 + bar / 2.0, pct), style.clone())
                        }))
                        .map_err(|e| e.to_string())?;
                }
            }
            // The legend beside the plot, so that it never hides a bar.
            legend
                .draw(&Text::new("strategy", (8, 44), ("sans-serif", 14)))
                .map_err(|e| e.to_string())?;
            for (k, st) in self.strategies.iter().enumerate() {
                let y = 68 + 22 * k as i32;
                legend
                    .draw(&Rectangle::new([(8, y), (22, y + 14)], palette(k).filled()))
                    .map_err(|e| e.to_string())?;
                legend
                    .draw(&Text::new(st.as_str(), (28, y + 1), ("sans-serif", 13)))
                    .map_err(|e| e.to_string())?;
            }
            root.present().map_err(|e| e.to_string())?;
        }
        Ok(svg)
    }
}

/// The bar chart's x axis: `n` domain slots of width 1, a tick at the centre of each.
struct Slots(usize);

impl Ranged for Slots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (lo, hi): (i32, i32)) -> i32 {
        lo + (f64::from(hi - lo) * value / self.0.max(1) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _: H) -> Vec<f64> {
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0 as f64
    }
}

/// Colour `k` of the bar chart (Tableau 10, repeating).
fn palette(k: usize) -> RGBColor {
    const C: [(u8, u8, u8); 10] = [
        (78, 121, 167),
        (242, 142, 43),
        (225, 87, 89),
        (118, 183, 178),
        (89, 161, 79),
        (237, 201, 72),
        (176, 122, 161),
        (255, 157, 167),
        (156, 117, 95),
        (186, 176, 172),
    ];
    let (r, g, b) = C[k % C.len()];
    RGBColor(r, g, b)
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
    fn chart_has_a_bar_per_domain_and_strategy_and_a_legend() {
        let r = Report {
            set: "s".into(),
            strategies: vec!["single:arith".into(), "specfuse".into(), "chared".into()],
            outcomes: ["single:arith", "specfuse", "chared"]
                .iter()
                .flat_map(|st| [outcome(st, "atlas", true), outcome(st, "words", *st == "chared")])
                .collect(),
        };
        let svg = r.chart_svg().expect("chart");
        assert!(svg.starts_with("<svg"), "{svg}");
        // Three domains (atlas, words, all); each strategy's colour fills one bar per domain plus
        // its legend swatch.
        for k in 0..3 {
            let RGBColor(red, green, blue) = palette(k);
            let fill = format!("fill=\"#{red:02X}{green:02X}{blue:02X}\"");
            let bars = svg
                .lines()
                .filter(|l| l.starts_with("<rect") && l.contains(&fill))
                .count();
            assert_eq!(bars, 3 + 1, "strategy {k}: {fill}\n{svg}");
        }
        for text in [
            "single:arith",
            "specfuse",
            "chared",
            "atlas (1)",
            "all (2)",
            "exact match (%)",
        ] {
            assert!(
                svg.contains(&format!("\n{text}\n</text>")),
                "{text} missing:\n{svg}"
            );
        }
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
