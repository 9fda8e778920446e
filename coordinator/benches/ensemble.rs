//! Coordinator benchmarks; prints tables (no timing assertions anywhere).
//!
//! `cargo bench -p coordinator --bench ensemble` (add `-- --quick` for a short run, `-- --overhead` for
//! section 1 alone, `-- --export` for section 1 with trace export off and then on)
//!
//! 1. Overhead per SpecFuse round and per CharED character over three *trivial* nodes: real gRPC
//!    servers on loopback that answer at once with fixed data of realistic size (32 characters per
//!    distribution, 10-token drafts with log-probabilities), so the time is the coordinator's
//!    (fan-out, state machines, protobuf, loopback) and not a model's; beside it the floor, the same
//!    three calls from a bare tonic client, and speculative CharED (drafts always accepted).
//! 2. Request bytes per CharED character at context lengths 100 and 10,000 (session deltas: must not
//!    grow with the context).
//! 3. Fan-out efficiency: three nodes that take 10, 20 and 40 ms per call; a round should take about
//!    the slowest node's time, not the sum.
//! 4. Mean active nodes per SpecFuse round with and without model exit, over the three bundled models
//!    plus two random-weight nodes (five members, as in the SpecFuse paper's 5 → 2.4).
//! 5. Section 1 again with OTLP trace export on, to an OTLP receiver in this process (last: the
//!    tracing subscriber is global), and the spans it received per request.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coordinator::evaluate::load_set;
use coordinator::service::{Coordinator, NodeSpec};
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::model_node_server::{ModelNode, ModelNodeServer};
use prost::Message as _;
use tonic::{Request, Response, Status};

/// A node that answers at once (after `delay`) with fixed data, and counts request bytes.
#[derive(Clone)]
struct Trivial {
    delay: Duration,
    next_char_bytes: Arc<AtomicU64>,
    next_char_calls: Arc<AtomicU64>,
}

/// A realistic next-character answer: 32 listed characters ('a' most likely), EOS and the rest.
fn char_list() -> pb::CharDistribution {
    let mut chars = vec![pb::CharProb {
        char: "a".into(),
        prob: 0.5,
    }];
    chars.extend("bcdefghijklmnopqrstuvwxyz .,;:!".chars().map(|c| pb::CharProb {
        char: c.to_string(),
        prob: 0.4 / 31.0,
    }));
    pb::CharDistribution {
        chars,
        eos_prob: 0.05,
        residual: 0.05,
        observed: None,
    }
}

impl Trivial {
    /// The node's delay; none at all for 0 (a zero `sleep` still waits for the timer's next
    /// millisecond tick, which would be charged to the coordinator).
    async fn wait(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

#[tonic::async_trait]
impl ModelNode for Trivial {
    async fn info(&self, _r: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(pb::InfoResponse {
            model_id: "trivial".into(),
            ..Default::default()
        }))
    }

    async fn propose_segment(
        &self,
        _r: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        self.wait().await;
        Ok(Response::new(pb::ProposeResponse {
            text: "The quick brown fox jumps over the lazy dog ".into(),
            token_logprobs: vec![-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, -1.0],
            finish_reason: pb::FinishReason::Length as i32,
            ..Default::default()
        }))
    }

    async fn score_candidates(
        &self,
        r: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        self.wait().await;
        let scores = r
            .into_inner()
            .candidates
            .iter()
            .map(|c| pb::CandidateScore {
                sum_logprob: -0.5,
                token_count: 2,
                char_count: c.chars().count() as u32,
                mean_logprob: -0.25,
            })
            .collect();
        Ok(Response::new(pb::ScoreResponse { scores, usage: None }))
    }

    async fn next_char_distribution(
        &self,
        r: Request<pb::NextCharRequest>,
    ) -> Result<Response<pb::NextCharResponse>, Status> {
        self.next_char_bytes
            .fetch_add(r.get_ref().encoded_len() as u64, Ordering::Relaxed);
        self.next_char_calls.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        let d = char_list();
        Ok(Response::new(pb::NextCharResponse {
            chars: d.chars,
            eos_prob: d.eos_prob,
            residual: d.residual,
            hypotheses: 1,
            usage: None,
        }))
    }

    async fn next_char_distributions(
        &self,
        r: Request<pb::NextCharsRequest>,
    ) -> Result<Response<pb::NextCharsResponse>, Status> {
        self.next_char_bytes
            .fetch_add(r.get_ref().encoded_len() as u64, Ordering::Relaxed);
        self.next_char_calls.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        let n = r.get_ref().continuation.chars().count() + 1;
        // A drafter drafts its own greedy choice, 'a', as far as asked (every draft is accepted).
        let dist = char_list();
        Ok(Response::new(pb::NextCharsResponse {
            positions: vec![dist; n + r.get_ref().draft_chars as usize],
            drafted: "a".repeat(r.get_ref().draft_chars as usize),
            hypotheses: 1,
            usage: None,
        }))
    }

    async fn close_session(
        &self,
        _r: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        Ok(Response::new(pb::CloseSessionResponse { existed: true }))
    }
}

async fn trivial_nodes(delays: &[u64]) -> anyhow::Result<(Vec<NodeSpec>, Vec<Trivial>)> {
    let mut specs = Vec::new();
    let mut nodes = Vec::new();
    for (i, &ms) in delays.iter().enumerate() {
        let node = Trivial {
            delay: Duration::from_millis(ms),
            next_char_bytes: Arc::default(),
            next_char_calls: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ModelNodeServer::new(node.clone()))
                .serve_with_incoming(ensemble_proto::net::incoming(listener)),
        );
        specs.push(NodeSpec {
            name: format!("t{i}"),
            url,
            weight: 1.0,
        });
        nodes.push(node);
    }
    Ok((specs, nodes))
}

fn raw(text: String, strategy: &str, max_chars: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw(text)),
        }),
        strategy: strategy.into(),
        max_chars,
        ..Default::default()
    }
}

/// Median of per-request µs per step.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn overhead(quick: bool, what: &str) -> anyhow::Result<()> {
    let (specs, _nodes) = trivial_nodes(&[0, 0, 0]).await?;
    let c = Coordinator::new(specs.clone(), Duration::from_secs(10)).await?;
    let reps = if quick { 5 } else { 30 };
    println!(
        "\n## Coordinator overhead, three trivial nodes on loopback, {what} (median of {reps} requests)\n"
    );
    println!("| strategy | steps per request | µs per step |\n|---|---:|---:|");
    let runs = strategy_runs();
    // The floor: the same calls from a bare tonic client, no coordinator.
    let mut clients = Vec::new();
    for spec in &specs {
        clients.push(pb::model_node_client::ModelNodeClient::connect(spec.url.clone()).await?);
    }
    let mut waves = Vec::new();
    for _ in 0..reps * 20 {
        let t = Instant::now();
        let calls = clients.iter_mut().map(|c| {
            c.next_char_distribution(pb::NextCharRequest {
                context: Some(pb::Context {
                    rtd_lambda: None,
                    session_id: "s".into(),
                    body: Some(pb::context::Body::Delta(pb::ContextDelta {
                        base_chars: 10,
                        append: "a".into(),
                    })),
                }),
                top_k: 32,
                ..Default::default()
            })
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        waves.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "| (floor: a bare tonic client, the same 3 next-char calls in parallel) | {} | {:.0} per wave |",
        reps * 20,
        median(waves)
    );
    for (label, req, unit) in runs {
        let mut per_char = Vec::new();
        let mut steps = 0;
        for _ in 0..reps {
            let (us, n) = per_step(&c, label, &req).await?;
            steps = n;
            per_char.push(us);
        }
        println!("| {label} | {steps} | {:.0} per {unit} |", median(per_char));
    }
    Ok(())
}

/// The three measured requests: label, request, what a step is.
fn strategy_runs() -> [(&'static str, pb::GenerateRequest, &'static str); 3] {
    let speculative = |mut r: pb::GenerateRequest| {
        r.chared = Some(pb::CharEdOptions {
            draft_chars: Some(16),
            ..Default::default()
        });
        r
    };
    [
        (
            "specfuse",
            raw("x".into(), "specfuse", 880),
            "round (3 propose + 3 score calls; 10-token drafts with log-probabilities)",
        ),
        (
            "chared",
            raw("x".into(), "chared", 60),
            "character (3 next-char calls; 32 characters listed)",
        ),
        (
            "chared, draft_chars 16",
            speculative(raw("x".into(), "chared", 255)),
            "character (a round: 1 draft + 2 verify calls; every draft accepted)",
        ),
    ]
}

/// A request's microseconds per step (a SpecFuse round or a character).
async fn per_step(c: &Coordinator, label: &str, req: &pb::GenerateRequest) -> anyhow::Result<(f64, u32)> {
    let t = Instant::now();
    let r = c.run(req.clone(), &mut |_| true).await?;
    let per = if label == "specfuse" {
        r.steps
    } else {
        r.text.chars().count() as u32
    };
    Ok((t.elapsed().as_secs_f64() * 1e6 / f64::from(per.max(1)), r.steps))
}

/// Section 1 with trace export paused and on in alternate requests of one process (same nodes,
/// same coordinator), so the difference is export's and not two runs' noise.
async fn overhead_ab(quick: bool, telemetry: &ensemble_proto::telemetry::Telemetry) -> anyhow::Result<()> {
    let (specs, _nodes) = trivial_nodes(&[0, 0, 0]).await?;
    let c = Coordinator::new(specs, Duration::from_secs(10)).await?;
    let reps = if quick { 6 } else { 40 };
    println!(
        "\n## Coordinator overhead with OTLP trace export off and on, alternate requests (to a receiver in this process; median of {reps} each)\n"
    );
    println!(
        "| strategy | µs per step, export off | export on | on / off | off / off (noise) | process CPU ms per request, off / on |\n|---|---:|---:|---:|---:|---:|"
    );
    for (label, req, unit) in strategy_runs() {
        // Requests in blocks of four, off / on / on / off, so that neither arm always runs second;
        // the two offs of a block, compared with each other, show what the noise alone gives.
        let (mut on, mut first_off, mut last_off) = (vec![], vec![], vec![]);
        let mut cpu = [0f64; 2];
        for i in 0..2 * reps {
            let exporting = matches!(i % 4, 1 | 2);
            telemetry.pause(!exporting);
            let c0 = process_cpu_s();
            let (us, _) = per_step(&c, label, &req).await?;
            cpu[usize::from(exporting)] += process_cpu_s() - c0;
            match i % 4 {
                0 => first_off.push(us),
                3 => last_off.push(us),
                _ => on.push(us),
            }
        }
        let noise = median(last_off.clone()) / median(first_off.clone());
        let (off, on) = (median([first_off, last_off].concat()), median(on));
        let cpu_ms = |c: f64| c * 1e3 / reps as f64;
        println!(
            "| {label} (per {unit}) | {off:.0} | {on:.0} | {:.3} | {noise:.3} | {:.1} / {:.1} |",
            on / off,
            cpu_ms(cpu[0]),
            cpu_ms(cpu[1])
        );
    }
    telemetry.pause(false);
    Ok(())
}

/// This process's CPU seconds so far (user + system, clock ticks of `/proc/self/stat`).
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

async fn bytes_per_char() -> anyhow::Result<()> {
    println!("\n## Request bytes per CharED character (per node)\n");
    println!(
        "| context chars | first call (full context) | later calls, mean | characters |\n|---:|---:|---:|---:|"
    );
    for context in [100usize, 10_000] {
        let (specs, nodes) = trivial_nodes(&[0, 0, 0]).await?;
        let c = Coordinator::new(specs, Duration::from_secs(10)).await?;
        let prompt: String = "lorem ipsum "
            .repeat(context / 12 + 1)
            .chars()
            .take(context)
            .collect();
        // One character first, to see the full-context call alone.
        c.run(raw(prompt.clone(), "chared", 1), &mut |_| true).await?;
        let first = nodes[0].next_char_bytes.load(Ordering::Relaxed);
        let first_calls = nodes[0].next_char_calls.load(Ordering::Relaxed);
        let r = c.run(raw(prompt, "chared", 200), &mut |_| true).await?;
        let total = nodes[0].next_char_bytes.load(Ordering::Relaxed) - first;
        let calls = nodes[0].next_char_calls.load(Ordering::Relaxed) - first_calls;
        // Of this request's calls, the first carries the full context; the rest are deltas.
        let later = (total - first) as f64 / (calls - 1).max(1) as f64;
        println!("| {context} | {first} | {later:.1} | {} |", r.steps);
    }
    Ok(())
}

async fn fan_out() -> anyhow::Result<()> {
    let delays = [10u64, 20, 40];
    let (specs, _nodes) = trivial_nodes(&delays).await?;
    let c = Coordinator::new(specs, Duration::from_secs(10)).await?;
    let rounds = 10u32;
    let t = Instant::now();
    let r = c
        .run(raw("x".into(), "specfuse", 3 * rounds), &mut |_| true)
        .await?;
    let per_round = t.elapsed().as_secs_f64() * 1e3 / f64::from(r.steps.max(1));
    let slowest = 2.0 * 40.0;
    let sum = 2.0 * delays.iter().sum::<u64>() as f64;
    println!("\n## Fan-out: nodes taking 10, 20, 40 ms per call (a round = propose + score)\n");
    println!(
        "| measured ms per round | slowest node (2 × 40 ms) | sum of nodes | measured / slowest |\n|---:|---:|---:|---:|"
    );
    println!(
        "| {per_round:.1} | {slowest:.0} | {sum:.0} | {:.2} |",
        per_round / slowest
    );
    Ok(())
}

async fn active_nodes(quick: bool) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("bench-rnd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut dirs = common::bundled_dirs();
    dirs.push((
        "random1".into(),
        model_node::fixtures::tiny_model_dir(&root, "llama", "byte_level", 5)?,
    ));
    dirs.push((
        "random2".into(),
        model_node::fixtures::tiny_model_dir(&root, "qwen2", "sentencepiece", 6)?,
    ));
    let (_keep, specs) = common::start_members(dirs).await?;
    let c = Coordinator::new(specs, Duration::from_secs(30)).await?;
    let items = load_set(&common::repo().join("eval/mixed.jsonl")).map_err(anyhow::Error::msg)?;
    let n = if quick { 6 } else { 30 };
    println!(
        "\n## Mean active nodes per SpecFuse round, five members (3 bundled + 2 random-weight), {n} mixed items, 2-token drafts\n"
    );
    println!("| model exit | mean active nodes per round | rounds | exact match |\n|---|---:|---:|---:|");
    for exit in [false, true] {
        let (mut active, mut rounds, mut correct) = (0.0, 0u32, 0);
        for it in &items[..n] {
            let req = pb::GenerateRequest {
                prompt: Some(it.prompt()),
                strategy: "specfuse".into(),
                max_chars: 40,
                specfuse: Some(pb::SpecFuseOptions {
                    segment_tokens: Some(2),
                    exit: Some(exit),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let r = c.run(req, &mut |_| true).await?;
            active += r.mean_active_nodes * f64::from(r.steps);
            rounds += r.steps;
            correct += usize::from(r.text.trim() == it.answer);
        }
        println!(
            "| {} | {:.2} | {rounds} | {correct}/{n} |",
            if exit { "on" } else { "off" },
            active / f64::from(rounds.max(1))
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--overhead`: section 1 only, e.g. under a profiler.
    let only_overhead = std::env::args().any(|a| a == "--overhead");
    // `--export`: section 1 with trace export off, then on (sections 2-4 skipped).
    let export_only = std::env::args().any(|a| a == "--export");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        overhead(quick, "trace export off").await?;
        if only_overhead {
            return Ok(());
        }
        if export_only {
            return with_export(quick).await;
        }
        bytes_per_char().await?;
        fan_out().await?;
        active_nodes(quick).await?;
        with_export(quick).await
    })
}

async fn with_export(quick: bool) -> anyhow::Result<()> {
    let (endpoint, received) = common::otlp::start().await?;
    let mut telemetry =
        ensemble_proto::telemetry::init_with("bench", ensemble_proto::telemetry::Export::To(&endpoint))
            .map_err(anyhow::Error::msg)?;
    overhead(quick, "trace export on (OTLP to a receiver in this process)").await?;
    overhead_ab(quick, &telemetry).await?;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    // Exported: section 1's requests (30 per strategy), then the alternate requests with export on
    // (half of 2 × 40 per strategy).
    let requests = 3 * if quick { 5 + 6 } else { 30 + 40 };
    let spans = received.spans().len();
    println!(
        "\nspans received: {spans} for {requests} requests ({:.1} per request: generate, rounds or characters, node calls), {:.0} protobuf bytes per span",
        spans as f64 / f64::from(requests),
        received.bytes() as f64 / spans.max(1) as f64
    );
    Ok(())
}
