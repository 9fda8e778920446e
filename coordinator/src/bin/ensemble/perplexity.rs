//! `ensemble perplexity`: bits per character of a text under every member and their CharED mixture
//! (the library's [`coordinator::perplexity`] behind the `PerplexityStream` RPC), with a progress bar,
//! Markdown and JSON reports.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use ensemble_proto::v1 as pb;

use super::{Target, status, with_target};

/// What `ensemble perplexity` measures and where it writes.
#[derive(Debug, Args)]
pub(crate) struct PerplexityArgs {
    /// The text: one document per line, or JSON Lines with --field.
    #[arg(long)]
    text: PathBuf,
    /// With JSON Lines: the field holding each document's text.
    #[arg(long)]
    field: Option<String>,
    /// Only the first N documents.
    #[arg(long)]
    limit: Option<usize>,
    /// Only the first N characters of each document.
    #[arg(long)]
    max_chars: Option<usize>,
    /// Also fit the mixture weights (EM), and the weights with a per-context entropy β, on the
    /// even-numbered documents and report both on the others.
    #[arg(long)]
    fit_weights: bool,
    /// With --fit-weights: write the cluster config (--config) to this file with the fitted mixture
    /// that did better on the held-out documents: each member's `weight`, and `[chared]
    /// entropy_beta` (0 for the static fit). Comments and everything else are kept.
    #[arg(long, requires = "fit_weights")]
    weights_out: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report's tables as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// The documents of a text file: one per non-empty line, or the `field` of each JSON line.
fn documents(
    path: &Path,
    field: Option<&str>,
    limit: Option<usize>,
    max_chars: Option<usize>,
) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut docs = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let doc = match field {
            Some(f) => {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?;
                v[f].as_str()
                    .with_context(|| format!("{} line {}: no string field {f:?}", path.display(), n + 1))?
                    .to_owned()
            }
            None => line.to_owned(),
        };
        docs.push(match max_chars {
            Some(m) => doc.chars().take(m).collect(),
            None => doc,
        });
    }
    if let Some(l) = limit {
        docs.truncate(l);
    }
    if docs.is_empty() {
        bail!(
            "{}: no document (one per line, or JSON Lines with --field)",
            path.display()
        );
    }
    Ok(docs)
}

/// The perplexity report as Markdown tables.
fn perplexity_table(r: &pb::PerplexityResponse) -> String {
    // The members' work per character (over all documents), in the first table only.
    let table = |rows: &[pb::ModelBits], work: bool| -> String {
        let mut t = String::from("| model | bits per char | bits per byte | weights |");
        t.push_str(if work {
            " calls / char | forward passes / char | positions / char | windows slid |\n|---|---:|---:|---|---:|---:|---:|---:|\n"
        } else {
            "\n|---|---:|---:|---|\n"
        });
        let per = |n: u64| n as f64 / r.chars.max(1) as f64;
        for m in rows {
            let w: Vec<String> = m.weights.iter().map(|w| format!("{w:.3}")).collect();
            let mut w = w.join(" / ");
            if m.entropy_beta != 0.0 {
                w.push_str(&format!(", entropy β {:.1}", m.entropy_beta));
            }
            t.push_str(&format!(
                "| {} | {:.4} | {:.4} | {} |",
                m.name, m.bits_per_char, m.bits_per_byte, w
            ));
            if work && m.weights.is_empty() {
                t.push_str(&format!(
                    " {:.3} | {:.3} | {:.3} | {} |",
                    per(m.calls),
                    per(m.forward_passes),
                    per(m.computed_positions),
                    m.windows_slid
                ));
            } else if work {
                t.push_str(" | | | |");
            }
            t.push('\n');
        }
        t
    };
    let mut out = format!(
        "{} characters, {} bytes\n\n{}",
        r.chars,
        r.bytes,
        table(&r.rows, true)
    );
    if !r.held_out.is_empty() {
        out.push_str(&format!(
            "\nheld out ({} characters of the odd-numbered documents; weights fitted on the others)\n\n{}",
            r.held_out_chars,
            table(&r.held_out, false)
        ));
    }
    out
}

/// Runs the command.
pub(crate) async fn run(target: &Target, args: PerplexityArgs) -> anyhow::Result<()> {
    let PerplexityArgs {
        text,
        field,
        limit,
        max_chars,
        fit_weights,
        weights_out,
        json,
        markdown,
    } = args;
    let docs = documents(&text, field.as_deref(), limit, max_chars)?;
    let req = pb::PerplexityRequest {
        documents: docs,
        fit_weights,
    };
    let r = with_target(target, async |mut client| {
        let mut events = client.perplexity_stream(req).await.map_err(status)?.into_inner();
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:40}] {pos}/{len} characters, {msg} {elapsed_precise} eta {eta}",
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
        );
        while let Some(e) = events.message().await.map_err(status)? {
            match e.event {
                Some(pb::perplexity_event::Event::Progress(p)) => {
                    bar.set_length(p.chars);
                    bar.set_position(p.chars_done);
                    bar.set_message(format!("{}/{} documents", p.documents_done, p.documents));
                }
                Some(pb::perplexity_event::Event::Done(r)) => {
                    bar.finish_and_clear();
                    return Ok(r);
                }
                None => {}
            }
        }
        bail!("the coordinator closed the stream without a report")
    })
    .await?;
    let md = perplexity_table(&r);
    println!("{md}");
    if let Some(p) = markdown {
        std::fs::write(&p, format!("# Bits per character: {}\n\n{md}", text.display()))
            .with_context(|| p.display().to_string())?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = weights_out {
        let config = std::fs::read_to_string(&target.config)
            .with_context(|| format!("--weights-out rewrites --config: {}", target.config.display()))?;
        // Relative model_dir paths are relative to the config's directory: written elsewhere, they
        // become absolute.
        let dir = |p: &Path| {
            let d = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            d.canonicalize().unwrap_or_else(|_| d.to_owned())
        };
        let (from, to) = (dir(&target.config), dir(&p));
        let rebase = (from != to).then_some(from.as_path());
        let out = config_with_weights(&config, &r, &text, rebase)
            .with_context(|| format!("{}: cannot set the weights", target.config.display()))?;
        std::fs::write(&p, out).with_context(|| p.display().to_string())?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = json {
        let rows = |rows: &[pb::ModelBits]| -> Vec<serde_json::Value> {
            rows.iter()
                .map(|m| {
                    serde_json::json!({"name": m.name, "bits_per_char": m.bits_per_char,
                        "bits_per_byte": m.bits_per_byte, "floored": m.floored, "weights": m.weights,
                        "calls": m.calls, "windows_slid": m.windows_slid, "entropy_beta": m.entropy_beta,
                        "forward_passes": m.forward_passes, "computed_positions": m.computed_positions})
                })
                .collect()
        };
        let v = serde_json::json!({"text": text, "chars": r.chars, "bytes": r.bytes,
            "rows": rows(&r.rows), "held_out_chars": r.held_out_chars, "held_out": rows(&r.held_out)});
        std::fs::write(&p, serde_json::to_string_pretty(&v)?).with_context(|| p.display().to_string())?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `config` (a cluster config's text) with the better held-out fitted mixture of `r` set: each
/// `[[nodes]]` entry's `weight` (matched by name) and `[chared] entropy_beta`; a comment on top says
/// where they come from. With `rebase`, relative `model_dir`s are joined to it.
fn config_with_weights(
    config: &str,
    r: &pb::PerplexityResponse,
    text: &Path,
    rebase: Option<&Path>,
) -> anyhow::Result<String> {
    let find = |name: &str| r.held_out.iter().find(|m| m.name == name);
    let (Some(fitted), Some(ctx)) = (find("fitted mixture"), find("fitted per-context mixture")) else {
        bail!("the report has no fitted mixture (run with --fit-weights)");
    };
    let best = if ctx.bits_per_char < fitted.bits_per_char {
        ctx
    } else {
        fitted
    };
    let members: Vec<&str> = r
        .rows
        .iter()
        .map(|m| m.name.as_str())
        .take(best.weights.len())
        .collect();
    let mut doc: toml_edit::DocumentMut = config.parse()?;
    let Some(nodes) = doc.get_mut("nodes").and_then(|n| n.as_array_of_tables_mut()) else {
        bail!("no [[nodes]] entries");
    };
    // The report must come from this config's cluster: the same members, by name.
    let mut names: Vec<&str> = nodes.iter().filter_map(|t| t.get("name")?.as_str()).collect();
    let mut want = members.clone();
    names.sort_unstable();
    want.sort_unstable();
    if names != want {
        bail!(
            "the config's members {names:?} are not the measured cluster's {want:?} \
             (--weights-out rewrites --config: give the config of the cluster measured)"
        );
    }
    for (name, w) in members.iter().zip(&best.weights) {
        let Some(node) = nodes
            .iter_mut()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
        else {
            bail!("no [[nodes]] entry named {name:?}");
        };
        // Six decimals, and never 0 (the config refuses weights that are not > 0; EM can drive a
        // dominated member's weight to nothing).
        node["weight"] = toml_edit::value(((w * 1e6).round() / 1e6).max(1e-6));
    }
    for node in nodes.iter_mut() {
        let dir = node.get("model_dir").and_then(|d| d.as_str()).map(PathBuf::from);
        if let (Some(base), Some(dir)) = (rebase, dir.filter(|d| d.is_relative())) {
            node["model_dir"] = toml_edit::value(base.join(dir).display().to_string());
        }
    }
    let chared = doc
        .entry("chared")
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .context("chared is not a table")?;
    chared["entropy_beta"] = toml_edit::value(best.entropy_beta);
    Ok(format!(
        "# Weights fitted by `ensemble perplexity --fit-weights` on the even-numbered documents of\n\
         # {}: {} ({:.4} bits per character on the odd-numbered ones).\n{doc}",
        text.display(),
        best.name,
        best.bits_per_char
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(name: &str, bpc: f64, weights: &[f64], beta: f64) -> pb::ModelBits {
        pb::ModelBits {
            name: name.into(),
            bits_per_char: bpc,
            weights: weights.to_vec(),
            entropy_beta: beta,
            ..Default::default()
        }
    }

    #[test]
    fn fitted_weights_are_written_into_the_config() -> anyhow::Result<()> {
        let config = "# keep me\nlisten = \"127.0.0.1:1\"\n\n[[nodes]]\nname = \"a\" # first\nurl = \"http://x:1\"\n\
                      model_dir = \"models/a\"\n\n[[nodes]]\nname = \"b\"\nurl = \"http://x:2\"\nweight = 3.0\n";
        let mut r = pb::PerplexityResponse {
            rows: vec![bits("a", 1.3, &[], 0.0), bits("b", 1.2, &[], 0.0)],
            held_out: vec![
                bits("fitted mixture", 1.10, &[0.25, 0.75], 0.0),
                bits("fitted per-context mixture", 1.09, &[0.4, 0.6], 0.7),
            ],
            ..Default::default()
        };
        let out = config_with_weights(config, &r, Path::new("t.txt"), Some(Path::new("/base")))?;
        assert!(
            out.contains("# keep me") && out.contains("name = \"a\" # first"),
            "{out}"
        );
        let v: toml::Table = toml::from_str(&out)?;
        let nodes = v["nodes"].as_array().expect("nodes");
        assert_eq!(nodes[0]["weight"].as_float(), Some(0.4));
        assert_eq!(nodes[1]["weight"].as_float(), Some(0.6));
        assert_eq!(nodes[0]["model_dir"].as_str(), Some("/base/models/a"));
        assert_eq!(v["chared"]["entropy_beta"].as_float(), Some(0.7));
        // The static fit when it did better on the held-out documents; β 0.
        r.held_out[1].bits_per_char = 1.11;
        let v: toml::Table = toml::from_str(&config_with_weights(config, &r, Path::new("t.txt"), None)?)?;
        assert_eq!(v["nodes"][0]["weight"].as_float(), Some(0.25));
        assert_eq!(v["nodes"][0]["model_dir"].as_str(), Some("models/a"));
        assert_eq!(v["chared"]["entropy_beta"].as_float(), Some(0.0));
        // A weight EM drove to 0 is written as the smallest the config takes.
        r.held_out[0].weights = vec![0.0, 1.0];
        let v: toml::Table = toml::from_str(&config_with_weights(config, &r, Path::new("t.txt"), None)?)?;
        assert_eq!(v["nodes"][0]["weight"].as_float(), Some(1e-6));
        // A report of another cluster: a member the config does not name, or one it lacks.
        r.rows.truncate(1);
        r.held_out[0].weights.truncate(1);
        r.held_out[1].weights.truncate(1);
        let e = config_with_weights(config, &r, Path::new("t.txt"), None).expect_err("b is not measured");
        assert!(e.to_string().contains("not the measured cluster"), "{e}");
        r.rows.push(bits("b", 1.2, &[], 0.0));
        r.held_out[0].weights = vec![0.5, 0.5];
        r.rows[1].name = "c".into();
        let e = config_with_weights(config, &r, Path::new("t.txt"), None).expect_err("no c");
        assert!(e.to_string().contains("\"c\""), "{e}");
        Ok(())
    }
}
