//! Command-line and environment configuration, grouped by concern. Every flag has an environment
//! variable (`MODEL_NODE_*`); each default is written once, here.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `model-node`: serve one HuggingFace model over gRPC.
#[derive(Debug, Parser)]
#[command(name = "model-node", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over gRPC.
    Serve(ServeArgs),
    /// Run the engine once in-process and print the text.
    Generate(GenerateArgs),
    /// Measure throughput and next-character costs; prints a table.
    Bench(BenchArgs),
    /// RTD reference stores.
    #[command(subcommand)]
    Rtd(RtdCommand),
    /// Write a HuggingFace model directory as GGUF (llama.cpp's names and metadata), quantized or not,
    /// with its tokenizer files beside it: a directory `serve --model-dir` (and llama.cpp) loads.
    Convert(ConvertArgs),
    /// Ask a running node for its grpc.health.v1 status (the container health check): exits 0 when
    /// it answers SERVING, 1 otherwise, with the reason on stderr.
    Health(HealthArgs),
}

impl Command {
    /// The model the subcommand loads (none for `health`).
    pub fn model(&self) -> Option<&ModelArgs> {
        match self {
            Command::Serve(a) => Some(&a.model),
            Command::Generate(a) => Some(&a.model),
            Command::Bench(a) => Some(&a.model),
            Command::Rtd(RtdCommand::Build(a)) => Some(&a.model),
            Command::Health(_) | Command::Convert(_) => None,
        }
    }
}

/// `model-node convert`.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// The HuggingFace model directory (config.json, tokenizer.json, safetensors).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// The output directory: model.gguf and the tokenizer files.
    #[arg(long)]
    pub out: PathBuf,
    /// GGML type of the matrices: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k … q6_k, or
    /// llama.cpp's mixes q4_k_m and q5_k_m (norms and biases stay f32; a matrix whose rows are not
    /// whole blocks of the type falls back to q8_0, f16 or f32).
    #[arg(long = "type", default_value = "q8_0", value_parser = crate::model::gguf::parse_type)]
    pub ty: crate::model::gguf::Quant,
}

/// `model-node health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The node's gRPC listen address (the same variable as `serve`); a wildcard address is probed
    /// on loopback, as from inside the node's container.
    #[arg(long, env = "MODEL_NODE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// The health service name: `ensemble.v1.ModelNode` (ready: loaded and not draining) or the
    /// empty string (the process).
    #[arg(long, default_value = "ensemble.v1.ModelNode")]
    pub service: String,
    /// How long to wait for the answer, milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// Numeric precision of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// f32 on CPU, bf16 on CUDA.
    Auto,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

/// Which model and where it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// HuggingFace model directory (config.json, tokenizer.json, *.safetensors), or a GGUF file (or a
    /// directory holding one): its metadata replaces config.json, and tokenizer.json /
    /// tokenizer_config.json beside it are used when present.
    #[arg(long, env = "MODEL_NODE_MODEL_DIR")]
    pub model_dir: PathBuf,
    /// Model id reported by Info (default: the directory name).
    #[arg(long, env = "MODEL_NODE_MODEL_ID")]
    pub model_id: Option<String>,
    /// `cpu` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "MODEL_NODE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weight precision.
    #[arg(long, env = "MODEL_NODE_DTYPE", value_enum, default_value = "auto")]
    pub dtype: DTypeArg,
    /// CPU threads for tensor kernels (0: the cgroup's CPU quota, else the available cores). Settled
    /// once at start; the effective count is in Info and the start-up log.
    #[arg(long, env = "MODEL_NODE_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Longest context + new tokens (default: the model's max_position_embeddings, at most 32768).
    #[arg(long, env = "MODEL_NODE_MAX_CONTEXT")]
    pub max_context: Option<usize>,
}

/// Session and queue limits.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Most sessions kept (least recently used evicted first).
    #[arg(long, env = "MODEL_NODE_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// KV-cache memory over all sessions, MiB.
    #[arg(long, env = "MODEL_NODE_KV_CACHE_MB", default_value_t = 2048)]
    pub kv_cache_mb: usize,
    /// Requests that may wait for the engine; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MODEL_NODE_QUEUE", default_value_t = 64)]
    pub queue: usize,
    /// Default hypotheses kept by NextCharDistribution.
    #[arg(long, env = "MODEL_NODE_CHAR_HYPOTHESES", default_value_t = 4)]
    pub char_hypotheses: usize,
    /// Hypotheses below this share of the total mass are dropped.
    #[arg(long, env = "MODEL_NODE_CHAR_MIN_MASS", default_value_t = 1e-4)]
    pub char_min_mass: f64,
}

/// `model-node serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Address to listen on.
    #[arg(long, env = "MODEL_NODE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Seconds in-flight calls get to finish after SIGTERM.
    #[arg(long, env = "MODEL_NODE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Address of the Prometheus `/metrics` endpoint (HTTP), or `off`.
    #[arg(long, env = "MODEL_NODE_METRICS_LISTEN", default_value = "0.0.0.0:9090", value_parser = listen_or_off)]
    pub metrics_listen: Listen,
    /// TLS.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Input size limits.
    #[command(flatten)]
    pub input: InputArgs,
    /// Co-LLM deferral.
    #[command(flatten)]
    pub deferral: DeferralArgs,
    /// RTD reference store.
    #[command(flatten)]
    pub rtd: RtdArgs,
}

/// RTD: a reference datastore mixed into every next-token distribution (ALGORITHMS.md "RTD"; the
/// file format is in [`crate::rtd`]).
#[derive(Debug, Clone, Args)]
pub struct RtdArgs {
    /// Reference store (written by `model-node rtd build` for this model). A relative path that does
    /// not exist from the working directory is looked up in the model directory. Default: none.
    #[arg(long, env = "MODEL_NODE_RTD_STORE")]
    pub rtd_store: Option<PathBuf>,
    /// λ in [0, 1): the store's share of each distribution (0: the store is not used).
    #[arg(long, env = "MODEL_NODE_RTD_LAMBDA", default_value_t = 0.5)]
    pub rtd_lambda: f64,
    /// Nearest keys per position (exact search).
    #[arg(long, env = "MODEL_NODE_RTD_K", default_value_t = 16)]
    pub rtd_k: usize,
    /// Temperature T of the neighbours' softmax over −(squared distance).
    #[arg(long, env = "MODEL_NODE_RTD_TEMPERATURE", default_value_t = 1.0)]
    pub rtd_temperature: f64,
    /// A position whose nearest key is farther than this (squared distance) keeps the model's own
    /// distribution (ours; default: infinite, the published constant λ).
    #[arg(long, env = "MODEL_NODE_RTD_MAX_DISTANCE", default_value_t = f64::INFINITY)]
    pub rtd_max_distance: f64,
}

impl Default for RtdArgs {
    fn default() -> Self {
        Self {
            rtd_store: None,
            rtd_lambda: 0.5,
            rtd_k: 16,
            rtd_temperature: 1.0,
            rtd_max_distance: f64::INFINITY,
        }
    }
}

/// `model-node rtd`.
#[derive(Debug, Subcommand)]
pub enum RtdCommand {
    /// Build a reference store: run the model over reference examples and keep, at every answer
    /// position, its last hidden state (the key) and the token that followed (the value).
    Build(RtdBuildArgs),
}

/// `model-node rtd build`.
#[derive(Debug, Clone, Args)]
pub struct RtdBuildArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSON Lines of examples: `{"messages": [...], "answer": "..."}` (the format of `eval/`,
    /// rendered with the model's chat template) or `{"text": "..."}` (raw text, every position).
    #[arg(long)]
    pub examples: PathBuf,
    /// The store written.
    #[arg(long)]
    pub out: PathBuf,
}

/// Co-LLM: the deferral head this node serves (ALGORITHMS.md "Co-LLM"; the file format is in
/// [`crate::deferral`]).
#[derive(Debug, Clone, Default, Args)]
pub struct DeferralArgs {
    /// Deferral head file (safetensors, written by `ensemble-train deferral`). A relative path that
    /// does not exist from the working directory is looked up in the model directory. Default: none;
    /// a `deferral.safetensors` beside the checkpoint is never loaded unless named here. With a head,
    /// ProposeSegment honours `defer_threshold` and Info reports the head.
    #[arg(long, env = "MODEL_NODE_DEFERRAL_HEAD")]
    pub deferral_head: Option<PathBuf>,
}

/// Input size limits, checked before anything is tokenized ([`ensemble_proto::limits`]).
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Most bytes in one message's content, a raw prompt, an answer or an appended delta.
    #[arg(long, env = "MODEL_NODE_MAX_MESSAGE_BYTES", default_value_t = 256 << 10)]
    pub max_message_bytes: usize,
    /// Most messages in one conversation.
    #[arg(long, env = "MODEL_NODE_MAX_MESSAGES", default_value_t = 1024)]
    pub max_messages: usize,
    /// Most bytes of prompt text in all (roles, contents and the answer so far).
    #[arg(long, env = "MODEL_NODE_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// Largest encoded gRPC request accepted, bytes (larger ones are refused before decoding).
    #[arg(long, env = "MODEL_NODE_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub max_request_bytes: usize,
}

impl InputArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> ensemble_proto::limits::InputLimits {
        ensemble_proto::limits::InputLimits {
            max_message_bytes: self.max_message_bytes,
            max_messages: self.max_messages,
            max_prompt_bytes: self.max_prompt_bytes,
            max_request_bytes: self.max_request_bytes,
        }
    }
}

/// TLS of the gRPC listener.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// Server certificate chain (PEM); with --tls-key, the node serves gRPC over TLS only.
    #[arg(long, env = "MODEL_NODE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "MODEL_NODE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA of the client certificates (PEM): clients (the coordinator) must present one (mutual TLS).
    #[arg(long, env = "MODEL_NODE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The server TLS files, when TLS is on.
    pub fn server(&self) -> Option<ensemble_proto::tls::ServerTls> {
        Some(ensemble_proto::tls::ServerTls {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// A listen address that can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

/// `HOST:PORT`, or `off` for none ([`ensemble_proto::parse_listen`], as a clap value).
pub fn listen_or_off(s: &str) -> Result<Listen, String> {
    ensemble_proto::parse_listen(s).map(Listen)
}

/// `model-node generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (a user message, unless --raw).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Use the prompt as raw text, without the chat template (empty: start from BOS).
    #[arg(long)]
    pub raw: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `model-node bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The model used for the decode comparison.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Tokenizer directories (tokenizer.json) for the next-character cost table.
    #[arg(long)]
    pub tokenizers: Vec<PathBuf>,
    /// Concurrent ProposeSegment streams for the batching table (`0`: skipped).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub streams: Vec<usize>,
    /// Tokens each stream drafts in the batching table.
    #[arg(long, default_value_t = 64)]
    pub stream_tokens: usize,
    /// Also write the batching table as an SVG line chart to this file: aggregate tokens/s against
    /// concurrent streams, one line per model measured (with `--random-llama`, two).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Also run the batching and KV tables on a random-weight Llama of ~25M parameters (hidden 512,
    /// 8 layers) that the bench writes to a temporary directory.
    #[arg(long)]
    pub random_llama: bool,
    /// Real text for the per-character CharED cost (teacher-forced through a session), e.g.
    /// ../shared/real/text/tinystories-valid-a.txt.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Characters of `--text` measured.
    #[arg(long, default_value_t = 400)]
    pub text_chars: usize,
    /// RTD: the cost of the exact k-NN mixture per token and per batch of 8 rows, at these store
    /// sizes (random keys of the model's hidden size), e.g. `10000,100000,1000000`.
    #[arg(long, value_delimiter = ',')]
    pub rtd_keys: Vec<usize>,
}
