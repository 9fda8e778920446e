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
    let table = |rows: &[pb::ModelBits]| -> String {
        let mut t = String::from(
            "| model | bits per char | bits per byte | weights | calls | windows slid |\n|---|---:|---:|---|---:|---:|\n",
        );
        for m in rows {
            let w: Vec<String> = m.weights.iter().map(|w| format!("{w:.3}")).collect();
            let mut w = w.join(" / ");
            if m.entropy_beta != 0.0 {
                w.push_str(&format!(", entropy β {:.1}", m.entropy_beta));
            }
            t.push_str(&format!(
                "| {} | {:.4} | {:.4} | {} | {} | {} |\n",
                m.name, m.bits_per_char, m.bits_per_byte, w, m.calls, m.windows_slid
            ));
        }
        t
    };
    let mut out = format!("{} characters, {} bytes\n\n{}", r.chars, r.bytes, table(&r.rows));
    if !r.held_out.is_empty() {
        out.push_str(&format!(
            "\nheld out ({} characters of the odd-numbered documents; weights fitted on the others)\n\n{}",
            r.held_out_chars,
            table(&r.held_out)
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
    if let Some(p) = json {
        let rows = |rows: &[pb::ModelBits]| -> Vec<serde_json::Value> {
            rows.iter()
                .map(|m| {
                    serde_json::json!({"name": m.name, "bits_per_char": m.bits_per_char,
                        "bits_per_byte": m.bits_per_byte, "floored": m.floored, "weights": m.weights,
                        "calls": m.calls, "windows_slid": m.windows_slid, "entropy_beta": m.entropy_beta})
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
