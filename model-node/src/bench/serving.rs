//! The serving tables of `model-node bench`, all through a real gRPC server on loopback:
//! - concurrent `ProposeSegment` streams (continuous batching): aggregate tokens/s and per-stream
//!   ms/token at 1, 4, 16, 64 streams (and [`streams_svg`], its chart);
//! - decode cost against context length (the KV cache appends in place);
//! - `NextCharDistribution` on real text, teacher-forced through a session: forward passes, positions
//!   and node milliseconds per character, the share outside forward passes, and wall against compute.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use ensemble_proto::v1 as pb;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use tonic::transport::Channel;

use crate::chars::CharOptions;
use crate::config::{LimitArgs, ModelArgs};
use crate::error::{Error, Result};
use crate::model::KvCache;

pub(super) fn err(e: impl std::fmt::Display) -> Error {
    Error::Server(e.to_string())
}

/// A node served on 127.0.0.1:0 for the duration of a table.
pub struct Served {
    /// The runtime the server and clients run on.
    pub rt: tokio::runtime::Runtime,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// What Info says.
    pub info: pb::InfoResponse,
    /// The engine's counters.
    pub totals: std::sync::Arc<crate::engine::Totals>,
}

impl Served {
    /// Loads `model` and serves it.
    pub fn start(model: &ModelArgs, limits: &LimitArgs) -> Result<Self> {
        let loaded = crate::node::load(model, limits)?;
        let info = loaded.info.clone();
        let totals = loaded.engine.totals().clone();
        let rt = tokio::runtime::Runtime::new().map_err(err)?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(err)?;
        let url = format!("http://{}", listener.local_addr().map_err(err)?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(crate::server::run(
            listener,
            loaded,
            CharOptions::default(),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(5),
        ));
        Ok(Self {
            rt,
            url,
            stop: Some(tx),
            info,
            totals,
        })
    }

    /// A new connection to the node.
    pub fn channel(&self) -> Result<Channel> {
        let url = self.url.clone();
        self.rt.block_on(async move {
            tonic::transport::Endpoint::from_shared(url)
                .map_err(err)?
                .connect()
                .await
                .map_err(err)
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub(super) fn raw_context(session: &str, prompt: &str, answer: &str) -> Option<pb::Context> {
    Some(pb::Context {
        rtd_lambda: None,
        session_id: session.into(),
        body: Some(pb::context::Body::Full(pb::FullContext {
            prompt: Some(pb::Prompt {
                kind: Some(pb::prompt::Kind::Raw(prompt.into())),
            }),
            answer: answer.into(),
        })),
    })
}

/// Stream `i` of the streams tables: a greedy proposal of `tokens` tokens after its own story start.
pub(super) fn stream_request(i: usize, tokens: usize) -> pb::ProposeRequest {
    pb::ProposeRequest {
        context: raw_context("", &format!("Story {i}: the cat"), ""),
        max_new_tokens: tokens as u32,
        stop: vec![],
        sampling: Some(pb::Sampling::default()),
        defer_threshold: None,
    }
}

/// Writes a random-weight Llama of ~25M parameters (hidden 512, 8 layers, 8 heads, MLP 1408, 2,048
/// positions) over the byte-level fixture tokenizer under `root`.
pub fn random_llama(root: &Path) -> Result<PathBuf> {
    let dir = crate::fixtures::tiny_model_dir(root, "llama", "byte_level", 11).map_err(err)?;
    let mut config = crate::fixtures::tiny_config("llama", 0).map_err(err)?;
    let text = std::fs::read_to_string(dir.join("config.json")).map_err(err)?;
    let written: serde_json::Value = serde_json::from_str(&text).map_err(err)?;
    if let (Some(o), Some(vocab)) = (config.as_object_mut(), written.get("vocab_size")) {
        o.insert("vocab_size".into(), vocab.clone());
        o.insert("hidden_size".into(), 512.into());
        o.insert("intermediate_size".into(), 1408.into());
        o.insert("num_hidden_layers".into(), 8.into());
        o.insert("num_attention_heads".into(), 8.into());
        o.insert("num_key_value_heads".into(), 8.into());
        o.insert("max_position_embeddings".into(), 2048.into());
        o.remove("rope_scaling");
    }
    crate::fixtures::write_model(&dir, &config, 11).map_err(err)?;
    Ok(dir)
}

/// One row of the concurrent-streams table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamsRow {
    /// Concurrent `ProposeSegment` streams.
    pub streams: usize,
    /// Tokens of all streams per wall second.
    pub tokens_per_s: f64,
    /// Mean over the streams of each stream's milliseconds per token.
    pub ms_per_token: f64,
}

/// The concurrent-streams table of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamsTable {
    /// The model's id, as its node reports it.
    pub model: String,
    /// One row per number of streams, in the order measured.
    pub rows: Vec<StreamsRow>,
}

/// Aggregate tokens/s and per-stream ms/token for each number of concurrent streams, after one
/// untimed round at the most streams (a serving node is warm: its allocator's pools grown, its
/// threads started): each row is the run of median aggregate among `repeat`. Prints the table and
/// returns it.
pub fn streams_table(
    model: &ModelArgs,
    limits: &LimitArgs,
    streams: &[usize],
    tokens: usize,
    repeat: usize,
) -> Result<StreamsTable> {
    let mut limits = limits.clone();
    let most = streams.iter().copied().max().unwrap_or(1);
    limits.queue = limits.queue.max(most * 2);
    let node = Served::start(model, &limits)?;
    let repeat = repeat.max(1);
    println!(
        "concurrent ProposeSegment streams, {} ({} params, {} kernel threads), {tokens} tokens each, greedy, through gRPC, median of {repeat} after a warm-up round",
        node.info.model_id, node.info.parameters, node.info.kernel_threads
    );
    println!();
    println!("| streams | aggregate tokens/s | per-stream ms/token | x single-stream aggregate |");
    println!("|---:|---:|---:|---:|");
    round(&node, most, tokens)?;
    let mut single = None;
    let mut rows = Vec::with_capacity(streams.len());
    for &n in streams {
        let mut runs = (0..repeat)
            .map(|_| round(&node, n, tokens))
            .collect::<Result<Vec<_>>>()?;
        runs.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
        let row = runs[runs.len() / 2];
        let base = *single.get_or_insert(row.tokens_per_s);
        println!(
            "| {n} | {:.1} | {:.2} | {:.2} |",
            row.tokens_per_s,
            row.ms_per_token,
            row.tokens_per_s / base
        );
        rows.push(row);
    }
    println!();
    Ok(StreamsTable {
        model: node.info.model_id.clone(),
        rows,
    })
}

/// One timed round: `n` greedy `ProposeSegment` calls of `tokens` tokens at once, each on its own
/// connection (opened before the clock starts).
fn round(node: &Served, n: usize, tokens: usize) -> Result<StreamsRow> {
    let channels = (0..n).map(|_| node.channel()).collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let results: Vec<(usize, f64)> = node.rt.block_on(async {
        let calls = channels.into_iter().enumerate().map(|(i, ch)| {
            tokio::spawn(async move {
                let mut c = pb::model_node_client::ModelNodeClient::new(ch);
                let t = Instant::now();
                let r = c
                    .propose_segment(stream_request(i, tokens))
                    .await
                    .map_err(err)?
                    .into_inner();
                let k = r.token_logprobs.len().max(1);
                Ok::<_, Error>((k, t.elapsed().as_secs_f64() * 1e3 / k as f64))
            })
        });
        let mut out = Vec::new();
        for h in calls.collect::<Vec<_>>() {
            out.push(h.await.map_err(err)??);
        }
        Ok::<_, Error>(out)
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let total: usize = results.iter().map(|r| r.0).sum();
    Ok(StreamsRow {
        streams: n,
        tokens_per_s: total as f64 / wall,
        ms_per_token: results.iter().map(|r| r.1).sum::<f64>() / results.len().max(1) as f64,
    })
}

/// A line chart as SVG of aggregate tokens/s against concurrent streams (log-scale axis, a tick at each
/// number measured), one series per table, named in the legend. The tokens/s axis is linear from 0,
/// or logarithmic (ticks 1, 2, 5 × 10ⁿ) when the values span more than 10×, as a 260K and a 25M model
/// do. The text is SVG `<text>`, so the viewer's fonts draw it.
pub fn streams_svg(tables: &[StreamsTable]) -> Result<String> {
    let mut ticks: Vec<f64> = tables
        .iter()
        .flat_map(|t| t.rows.iter().map(|r| r.streams as f64))
        .collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let (lo, hi) = (
        ticks.first().copied().unwrap_or(1.0).max(1.0),
        ticks.last().copied().unwrap_or(1.0).max(1.0),
    );
    let x = (lo / 1.3..hi * 1.3).log_scale().with_key_points(ticks);
    let (least, most) = tables
        .iter()
        .flat_map(|t| t.rows.iter().map(|r| r.tokens_per_s))
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0_f64), |(a, b), v| (a.min(v), b.max(v)));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let drawn = if most > 10.0 * least {
            let (from, to) = (least / 1.5, most * 1.5);
            let decades = (from.log10().floor() as i32)..=(to.log10().ceil() as i32);
            let y_ticks: Vec<f64> = decades
                .flat_map(|d| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(d)))
                .filter(|v| (from..=to).contains(v))
                .collect();
            draw_streams(&root, x, (from..to).log_scale().with_key_points(y_ticks), tables)
        } else {
            let top = if most > 0.0 { most * 1.15 } else { 1.0 };
            draw_streams(&root, x, RangedCoordf64::from(0.0..top), tables)
        };
        drawn.map_err(|e| Error::Internal(e.to_string()))?;
    }
    Ok(svg)
}

/// Draws [`streams_svg`]'s chart on `root` with the given axes.
fn draw_streams<X, Y>(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    x: X,
    y: Y,
    tables: &[StreamsTable],
) -> std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Continuous batching: aggregate decode throughput",
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("concurrent ProposeSegment streams")
        .y_desc("aggregate tokens/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (k, t) in tables.iter().enumerate() {
        let colour = Palette99::pick(k).to_rgba();
        let points: Vec<(f64, f64)> = t
            .rows
            .iter()
            .map(|r| (r.streams as f64, r.tokens_per_s))
            .collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)).point_size(4))?
            .label(t.model.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()
}

/// ms per decoded token after a context of 16 and of ~1,000 positions (bare model, batch of one), and
/// ms per batched decode step of 1, 4, 16 and 32 sequences (bare model).
pub fn kv_table(loaded: &crate::node::Loaded) -> Result<()> {
    let (m, id) = (loaded.engine.model(), loaded.info.model_id.as_str());
    on_engine_pool(|| kv_rows(m, id))
}

/// Runs `f` on a worker of a kernel pool of its own, as the engine runs its passes (its loop is the
/// pool's first worker): a parallel kernel then wakes only the other workers. From the bench's own
/// thread every product would wake the pool and sleep until it is done (a 16-sequence babyllama step
/// measured ~1.6 ms so, ~0.8 ms on the engine's arrangement).
fn on_engine_pool<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .map_err(err)?
        .install(f)
}

fn kv_rows(m: &crate::model::Transformer, model_id: &str) -> Result<()> {
    let steps = 32;
    let long = 1000.min(m.max_positions().saturating_sub(steps + 1));
    println!("decode cost against context length, {model_id} ({steps} tokens after the context)");
    println!();
    println!("| context positions | ms/token | KV capacity after |");
    println!("|---:|---:|---:|");
    for ctx in [16, long] {
        let tokens: Vec<u32> = (0..ctx as u32).map(|i| 3 + i % 200).collect();
        let input = Tensor::new(tokens.as_slice(), m.device())?.unsqueeze(0)?;
        let (_, mut kv) = m.forward(&input, &KvCache::default(), false)?;
        let t0 = Instant::now();
        for i in 0..steps {
            let next = m.forward_ragged(&[5 + i as u32 % 100], &[&kv])?;
            kv = next.caches.into_iter().next().unwrap_or_default();
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!("| {ctx} | {ms:.3} | {} |", kv.capacity());
    }
    println!();
    Ok(())
}

/// A bare batched decode step (no sessions, sampling or gRPC) at 1, 4, 16 and 32 sequences of 64
/// positions: separates the model's cost from the engine's in the streams table.
pub fn step_table(loaded: &crate::node::Loaded) -> Result<()> {
    let (m, id) = (loaded.engine.model(), loaded.info.model_id.as_str());
    on_engine_pool(|| step_rows(m, id))
}

fn step_rows(m: &crate::model::Transformer, model_id: &str) -> Result<()> {
    let steps = 32;
    // Token ids from 3 up, within the vocabulary (babyllama's has 105).
    let vocab = m.config().vocab_size.max(4) as u32 - 3;
    println!(
        "batched decode step, bare model, {model_id} (sequences of 64 positions, {steps} steps, median of 3; the engine's step without sessions, sampling or gRPC, on a worker of its own kernel pool as the engine runs)"
    );
    println!();
    println!("| sequences | ms/step | ms/step per sequence | x one sequence's step |");
    println!("|---:|---:|---:|---:|");
    let mut single = None;
    for rows in [1usize, 4, 16, 32] {
        let mut times = Vec::with_capacity(3);
        for _ in 0..3 {
            let mut kvs = Vec::with_capacity(rows);
            for r in 0..rows {
                let tokens: Vec<u32> = (0..64u32).map(|i| 3 + (i * 7 + r as u32) % vocab).collect();
                let input = Tensor::new(tokens.as_slice(), m.device())?.unsqueeze(0)?;
                kvs.push(m.forward(&input, &KvCache::default(), false)?.1);
            }
            let t0 = Instant::now();
            for i in 0..steps {
                let next: Vec<u32> = (0..rows).map(|r| 3 + (i + r) as u32 % vocab).collect();
                let refs: Vec<&KvCache> = kvs.iter().collect();
                kvs = m.forward_ragged(&next, &refs)?.caches;
            }
            times.push(t0.elapsed().as_secs_f64() * 1e3 / steps as f64);
        }
        let ms = super::median(times);
        let one = *single.get_or_insert(ms);
        println!("| {rows} | {ms:.3} | {:.3} | {:.2} |", ms / rows as f64, ms / one);
    }
    println!();
    Ok(())
}

/// `NextCharDistribution` teacher-forced through a session over `chars` characters of `text`: each
/// call appends the previous character as a delta and asks for the next distribution.
pub fn chars_table(model: &ModelArgs, limits: &LimitArgs, text: &str, chars: usize) -> Result<()> {
    let node = Served::start(model, limits)?;
    let mut client = pb::model_node_client::ModelNodeClient::new(node.channel()?);
    let text: Vec<char> = text.chars().filter(|c| *c != '\n').take(chars).collect();
    println!(
        "NextCharDistribution on real text, {} ({} characters teacher-forced through one session; per character)",
        node.info.model_id,
        text.len()
    );
    println!();
    println!(
        "| top_k | forward passes | positions | node compute ms | in forward passes ms | outside forward passes | wall ms (client) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for top_k in [32u32, 256] {
        let session = format!("bench-chars-{top_k}");
        let (mut passes, mut positions) = (0u64, 0u64);
        let (mut compute, mut forward, mut wall) = (0.0, 0.0, 0.0);
        for (i, _) in text.iter().enumerate() {
            let context = if i == 0 {
                raw_context(&session, "", "")
            } else {
                Some(pb::Context {
                    rtd_lambda: None,
                    session_id: session.clone(),
                    body: Some(pb::context::Body::Delta(pb::ContextDelta {
                        base_chars: (i - 1) as u64,
                        append: text[i - 1].to_string(),
                    })),
                })
            };
            let req = pb::NextCharRequest {
                context,
                top_k,
                ..Default::default()
            };
            let t0 = Instant::now();
            let r = node
                .rt
                .block_on(client.next_char_distribution(req))
                .map_err(err)?
                .into_inner();
            wall += t0.elapsed().as_secs_f64() * 1e3;
            let u = r.usage.unwrap_or_default();
            passes += u64::from(u.forward_passes);
            positions += u64::from(u.computed_positions);
            compute += u.compute_ms;
            forward += u.forward_ms;
        }
        let n = text.len().max(1) as f64;
        println!(
            "| {top_k} | {:.2} | {:.2} | {:.3} | {:.3} | {:.0}% | {:.3} |",
            passes as f64 / n,
            positions as f64 / n,
            compute / n,
            forward / n,
            100.0 * (compute - forward) / compute.max(1e-9),
            wall / n
        );
    }
    println!();
    Ok(())
}

/// `NextCharDistributions` teacher-forced through a session: each call asks for the distributions
/// along the next `chunk` characters of `text` (speculative CharED's verify call), then appends them.
pub fn char_runs_table(model: &ModelArgs, limits: &LimitArgs, text: &str, chars: usize) -> Result<()> {
    let node = Served::start(model, limits)?;
    let mut client = pb::model_node_client::ModelNodeClient::new(node.channel()?);
    let text: Vec<char> = text.chars().filter(|c| *c != '\n').take(chars).collect();
    println!(
        "NextCharDistributions on real text, {} ({} characters teacher-forced through one session, top_k 32; per character; chunk 1 asks NextCharDistribution)",
        node.info.model_id,
        text.len()
    );
    println!();
    println!(
        "| characters per call | calls | forward passes | positions | node compute ms | in forward passes ms | wall ms (client) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for chunk in [1usize, 4, 8, 16] {
        let session = format!("bench-runs-{chunk}");
        let (mut calls, mut passes, mut positions) = (0u64, 0u64, 0u64);
        let (mut compute, mut forward, mut wall) = (0.0, 0.0, 0.0);
        let mut done = 0usize;
        let mut pending = String::new();
        while done < text.len() {
            let context = if done == 0 {
                raw_context(&session, "", "")
            } else {
                Some(pb::Context {
                    rtd_lambda: None,
                    session_id: session.clone(),
                    body: Some(pb::context::Body::Delta(pb::ContextDelta {
                        base_chars: (done - pending.chars().count()) as u64,
                        append: std::mem::take(&mut pending),
                    })),
                })
            };
            let end = (done + chunk).min(text.len());
            // The call answers positions done..=end-1 given text[..done], plus the one after.
            let continuation: String = text[done..end - 1].iter().collect();
            let t0 = Instant::now();
            let u = if chunk == 1 {
                let req = pb::NextCharRequest {
                    context,
                    top_k: 32,
                    ..Default::default()
                };
                let r = node
                    .rt
                    .block_on(client.next_char_distribution(req))
                    .map_err(err)?;
                r.into_inner().usage
            } else {
                let req = pb::NextCharsRequest {
                    context,
                    continuation,
                    top_k: 32,
                    ..Default::default()
                };
                let r = node
                    .rt
                    .block_on(client.next_char_distributions(req))
                    .map_err(err)?;
                r.into_inner().usage
            };
            wall += t0.elapsed().as_secs_f64() * 1e3;
            let u = u.unwrap_or_default();
            calls += 1;
            passes += u64::from(u.forward_passes);
            positions += u64::from(u.computed_positions);
            compute += u.compute_ms;
            forward += u.forward_ms;
            pending = text[done..end].iter().collect();
            done = end;
        }
        let n = text.len().max(1) as f64;
        println!(
            "| {chunk} | {:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} |",
            calls as f64 / n,
            passes as f64 / n,
            positions as f64 / n,
            compute / n,
            forward / n,
            wall / n
        );
    }
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_chart_has_a_line_per_model_and_a_legend() {
        let table = |model: &str, scale: f64| StreamsTable {
            model: model.into(),
            rows: [1, 4, 16, 64]
                .iter()
                .map(|&n| StreamsRow {
                    streams: n,
                    tokens_per_s: scale * (n as f64).sqrt(),
                    ms_per_token: 10.0,
                })
                .collect(),
        };
        let svg = streams_svg(&[table("stories260K", 900.0), table("random-llama-25M", 80.0)]).expect("svg");
        assert!(svg.starts_with("<svg"), "{svg}");
        for k in 0..2 {
            let (r, g, b) = Palette99::pick(k).rgb();
            let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
            // The series' polyline and its legend line.
            let lines = svg
                .lines()
                .filter(|l| l.starts_with("<polyline") && l.contains(&stroke))
                .count();
            assert_eq!(lines, 2, "series {k}: {stroke}\n{svg}");
        }
        // 80 to 7,200 tokens/s: a log axis, ticks 1-2-5.
        for text in [
            "stories260K",
            "random-llama-25M",
            "1",
            "4",
            "16",
            "64",
            "aggregate tokens/s",
            "100",
            "200",
            "5000",
        ] {
            assert!(
                svg.contains(&format!("\n{text}\n</text>")),
                "{text} missing:\n{svg}"
            );
        }
        // One model: a linear axis from 0.
        let svg = streams_svg(&[table("stories260K", 900.0)]).expect("svg");
        assert!(svg.contains("\n0\n</text>"), "{svg}");
        assert!(svg.contains("\nstories260K\n</text>"), "{svg}");
    }
}
