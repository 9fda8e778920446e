//! The engine: the model and all session state, owned by one thread that takes jobs from a bounded
//! queue. gRPC handlers never touch tensors; they send a [`Job`] with a reply channel and await it.
//!
//! # Layout
//! - [`text`]: prompt rendering, canonical tokenization, the token-healing cut.
//! - [`session`]: sessions, per-session prefix KV caches, LRU eviction, work counters.
//! - [`ops`]: resolving a context into a session; scoring on it.
//! - [`nextchar`]: the next-character distribution, and the distributions along a continuation.
//! - [`decode`]: proposals as resumable decodes, stepped one token at a time.
//! - [`walk`]: the calls that follow token paths (next-character questions, string-prefix scores)
//!   as futures the engine thread polls, each forward pass they wait for run by the scheduler.
//! - [`sched`]: the engine thread's scheduler (continuous batching): every step runs the running
//!   decodes, the waiting scores' candidate rows and the waiting walks' positions in one batched
//!   forward pass.

pub mod decode;
pub mod nextchar;
pub mod ops;
pub mod sched;
pub mod session;
pub mod text;
pub mod walk;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::chars::CharOptions;
use crate::error::{Error, Result};
use crate::model::Transformer;
pub use nextchar::{CharRun, CharsOut};
pub use ops::{CandidateScore, Finish, Proposal, ProposeParams, Scores};
use session::Sessions;
pub use session::Usage;
pub use text::PromptSpec;
use text::TextCodec;

/// Which context a call is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextSpec {
    /// Session id; empty for a one-off context.
    pub session: String,
    /// Full context or delta.
    pub body: ContextBody,
    /// RTD: this call's λ (`None`: the node's).
    pub rtd_lambda: Option<f64>,
}

/// The body of a context.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextBody {
    /// The whole context.
    Full {
        /// The prompt.
        prompt: PromptSpec,
        /// The answer so far.
        answer: String,
    },
    /// Text appended to a session's answer.
    Delta {
        /// Characters of the session's answer the client assumes.
        base_chars: u64,
        /// New text.
        append: String,
    },
}

/// A unit of work for the engine thread.
#[derive(Debug, Clone)]
pub enum Job {
    /// Draft a segment.
    Propose(ContextSpec, ProposeParams),
    /// Score candidates.
    Score(ContextSpec, Vec<String>),
    /// Score candidates as string prefixes (with, per candidate, whether it ends the answer), with
    /// these character-marginal options.
    ScorePrefix(ContextSpec, Vec<String>, Vec<bool>, CharOptions),
    /// Next-character distribution.
    NextChar(ContextSpec, usize, CharOptions),
    /// Next-character distributions along a continuation (text, draft characters, top-k, options).
    NextChars(ContextSpec, NextCharsParams),
    /// Drop a session.
    Close(String),
}

/// The engine's answer to a [`Job`].
#[derive(Debug)]
pub enum Reply {
    /// For [`Job::Propose`].
    Proposal(Proposal),
    /// For [`Job::Score`].
    Scores(Scores),
    /// For [`Job::NextChar`].
    Chars(CharsOut),
    /// For [`Job::NextChars`].
    CharRun(CharRun),
    /// For [`Job::Close`]: whether the session existed.
    Closed(bool),
}

/// What a [`Job::NextChars`] asks.
#[derive(Debug, Clone, PartialEq)]
pub struct NextCharsParams {
    /// Text after the answer whose positions are asked about.
    pub continuation: String,
    /// Most characters of the node's own greedy draft after it.
    pub draft_chars: usize,
    /// Characters listed per position.
    pub top_k: usize,
    /// Character-marginal options.
    pub opts: CharOptions,
    /// Also price the continuation's own character at each of its positions, exactly.
    pub observed: bool,
}

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    /// Longest context + new tokens.
    pub max_context: usize,
    /// Most sessions kept.
    pub max_sessions: usize,
    /// KV-cache budget over all sessions, bytes.
    pub kv_budget_bytes: usize,
    /// Jobs that may wait in the queue.
    pub queue_capacity: usize,
}

/// Counters shared between the engine thread and the server (monotonic unless noted).
#[derive(Debug, Default)]
pub struct Totals {
    /// Positions run through the model.
    pub computed_positions: AtomicU64,
    /// Forward passes.
    pub forward_passes: AtomicU64,
    /// Jobs done.
    pub jobs: AtomicU64,
    /// Sessions held now (gauge).
    pub sessions: AtomicU64,
    /// KV bytes held now (gauge).
    pub kv_bytes: AtomicU64,
    /// Jobs waiting now (gauge).
    pub queued: AtomicU64,
    /// Batched decode passes (one per step of the running proposals).
    pub batched_steps: AtomicU64,
    /// Sequences advanced by those passes (their mean batch size is rows / steps).
    pub batched_rows: AtomicU64,
    /// Scored candidates' positions computed inside those passes, beside the decode rows.
    pub merged_score_rows: AtomicU64,
    /// Walks' positions (next-character look-ahead, string-prefix scores) computed inside those
    /// passes.
    pub merged_walk_rows: AtomicU64,
}

struct Envelope {
    job: Job,
    reply: oneshot::Sender<Result<Reply>>,
    enqueued: Instant,
}

/// The async side's handle: cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    /// Unbounded: the bound on work is counted in `totals.queued` (closes are not bounded).
    tx: mpsc::UnboundedSender<Envelope>,
    capacity: usize,
    totals: Arc<Totals>,
}

impl EngineHandle {
    /// Queues a job and waits for its reply. Work (propose, score, next-char) beyond the queue's
    /// capacity is [`Error::Busy`] at once; [`Job::Close`] is never refused and never waits behind
    /// work: the engine thread takes it as soon as it arrives, between two decode steps. Dropping
    /// the returned future (client gone) makes the engine skip or stop the job.
    pub async fn call(&self, job: Job) -> Result<Reply> {
        let work = !matches!(job, Job::Close(_));
        if work {
            let before = self.totals.queued.fetch_add(1, Ordering::Relaxed);
            if before >= self.capacity as u64 {
                self.totals.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(Error::Busy { limit: self.capacity });
            }
        }
        let (reply, rx) = oneshot::channel();
        let env = Envelope {
            job,
            reply,
            enqueued: Instant::now(),
        };
        if self.tx.send(env).is_err() {
            if work {
                self.totals.queued.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(Error::ShuttingDown);
        }
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The shared counters.
    pub fn totals(&self) -> &Arc<Totals> {
        &self.totals
    }
}

/// The model, its tokenizer and the sessions; lives on the engine thread.
pub struct Engine {
    model: Transformer,
    codec: Arc<TextCodec>,
    /// Tokens a proposal may produce: EOS and every token with text.
    text_ids: Vec<u32>,
    sessions: Sessions,
    limits: EngineLimits,
    totals: Arc<Totals>,
}

impl Engine {
    /// An engine over a loaded model.
    pub fn new(model: Transformer, codec: TextCodec, limits: EngineLimits) -> Self {
        let sessions = Sessions::new(limits.max_sessions, limits.kv_budget_bytes);
        let vocab = &codec.vocab;
        let text_ids = (0..vocab.n_rows() as u32)
            .filter(|&t| vocab.is_eos(t) || vocab.token_bytes(t).is_some_and(|b| !b.is_empty()))
            .collect();
        Self {
            model,
            codec: Arc::new(codec),
            text_ids,
            sessions,
            limits,
            totals: Arc::default(),
        }
    }

    /// The model.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// The text codec.
    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// The limits.
    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// The shared counters (the handle's, once spawned).
    pub fn totals(&self) -> &Arc<Totals> {
        &self.totals
    }

    /// Starts the engine thread; the thread ends when every handle is dropped.
    pub fn spawn(self) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let capacity = self.limits.queue_capacity.max(1);
        let (tx, rx) = mpsc::unbounded_channel::<Envelope>();
        let totals = self.totals.clone();
        let handle = EngineHandle { tx, capacity, totals };
        let engine = self;
        // The engine loop runs on a worker of its own kernel pool (as many threads as the global
        // one): a parallel kernel then runs its first part on the engine's own thread and wakes only
        // the other workers, instead of handing every product to a pool while the engine thread
        // sleeps and is woken again (two wake-ups per product, ~60 per token).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("engine-{i}"))
            .build()
            .map_err(|e| Error::ModelDir(format!("cannot start the engine's kernel threads: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || pool.install(move || sched::serve(engine, rx)))
            .map_err(|e| Error::ModelDir(format!("cannot start the engine thread: {e}")))?;
        Ok((handle, thread))
    }

    /// Runs one job now, on the calling thread (the `generate` command and benchmarks use this).
    pub fn run(&mut self, job: Job, queue_ms: f64, cancelled: &dyn Fn() -> bool) -> Result<Reply> {
        let start = Instant::now();
        if walk::is_walk(&job) {
            // Next-character questions and string-prefix scores: each pass of the walk runs at once,
            // alone, under the call's λ.
            let result = self.begin_walk(job).and_then(|w| {
                let end = self.drive(w)?;
                self.end_walk(end, queue_ms, start.elapsed().as_secs_f64() * 1e3)
            });
            self.after_call();
            return result;
        }
        // RTD: this call's λ applies to its forward passes (a proposal sets its own, per row).
        let lambda = match &job {
            Job::Score(c, _) => c.rtd_lambda,
            _ => None,
        };
        self.model.set_rtd_lambdas(lambda.map(|l| vec![Some(l)]));
        let result = match job {
            Job::Close(id) => Ok(Reply::Closed(self.sessions.close(&id))),
            Job::Propose(ctx, p) => self.propose_now(ctx, p, cancelled).map(|(mut r, u)| {
                r.usage = u;
                Reply::Proposal(r)
            }),
            Job::Score(ctx, c) => self
                .with_session(ctx, |e, s, u| e.score(s, &c, u))
                .map(|(mut r, u)| {
                    r.usage = u;
                    Reply::Scores(r)
                }),
            _ => Err(Error::Internal("a walk reached the plain path".into())),
        };
        self.model.set_rtd_lambdas(None);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let mut result = result;
        match &mut result {
            Ok(Reply::Proposal(r)) => (r.usage.queue_ms, r.usage.compute_ms) = (queue_ms, ms),
            Ok(Reply::Scores(r)) => (r.usage.queue_ms, r.usage.compute_ms) = (queue_ms, ms),
            Ok(Reply::Chars(r)) => (r.usage.queue_ms, r.usage.compute_ms) = (queue_ms, ms),
            Ok(Reply::CharRun(r)) => (r.usage.queue_ms, r.usage.compute_ms) = (queue_ms, ms),
            _ => {}
        }
        self.after_call();
        result
    }

    /// Counts a finished call and refreshes the session gauges.
    fn after_call(&self) {
        self.totals.jobs.fetch_add(1, Ordering::Relaxed);
        self.totals
            .sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        self.totals
            .kv_bytes
            .store(self.sessions.bytes() as u64, Ordering::Relaxed);
    }

    /// Resolves the context into a session, runs `f`, puts the session back (even on error).
    fn with_session<T>(
        &mut self,
        ctx: ContextSpec,
        f: impl FnOnce(&mut Self, &mut session::Session, &mut Usage) -> Result<T>,
    ) -> Result<(T, Usage)> {
        let mut session = self.resolve(ctx)?;
        let mut usage = Usage {
            context_tokens: session.tokens.len(),
            ..Usage::default()
        };
        let result = f(self, &mut session, &mut usage);
        self.count_work(&usage);
        self.sessions.put(session);
        result.map(|r| (r, usage))
    }

    /// Adds a call's positions and passes to the totals.
    fn count_work(&self, usage: &Usage) {
        self.totals
            .computed_positions
            .fetch_add(usage.computed_positions as u64, Ordering::Relaxed);
        self.totals
            .forward_passes
            .fetch_add(usage.forward_passes as u64, Ordering::Relaxed);
    }
}
