//! The coordinator's configuration file (TOML), shared by `coordinator serve` and `ensemble up`.
//! Flags and `COORDINATOR_*` environment variables override it (see `main.rs`).
//!
//! ```toml
//! listen = "0.0.0.0:50050"
//! deadline_ms = 30000           # per node RPC
//! retries = 1                   # retries of a refused/unavailable node call (on another replica)
//! eject_after = 1               # consecutive failed calls (deadline, unreachable) that eject a member
//!                               # (0: never); new requests skip it until a trial call succeeds
//! eject_ms = 5000               # first ejection time (times the number of ejections, at most 10x)
//! default_strategy = "specfuse" # or "chared", "single:NAME"
//! max_chars = 256               # default answer length when a client gives none (HTTP, CLI)
//! max_concurrent_requests = 256 # more at once are refused: RESOURCE_EXHAUSTED / HTTP 429 + Retry-After
//! min_healthy_nodes = 1         # readiness is NOT_SERVING (HTTP /ready 503) below this many members up
//! probe_ms = 2000               # background Info probe of every member (0: none); a failed probe ejects
//! max_message_bytes = 262144    # input limits, checked before anything is tokenized or sent on:
//! max_messages = 1024           #   one message's bytes, messages per conversation,
//! max_prompt_bytes = 1048576    #   prompt bytes in all,
//! max_request_bytes = 4194304   #   one encoded gRPC request or HTTP body
//!
//! [specfuse]                    # defaults for requests that leave a field unset
//! segment_tokens = 10
//!
//! [chared]
//! temperature = 0.0
//!
//! [colm]                        # Co-LLM defaults (every field optional)
//! base = "general"              # default: the first member whose node has a deferral head
//! assistants = ["arith"]        # default: every member the base's head names
//! eta = 0.65                    # default: the threshold stored with the head
//! handoff = "token"             # or "word"
//!
//! [pipeline]                    # FSLM: the default stages (a request may give its own)
//! fallback = "general"          # runs any stage whose member fails
//! [[pipeline.stages]]
//! name = "draft"
//! node = "general"
//! template = "{{ request }}"    # minijinja: request, previous, stages.NAME
//! max_chars = 64
//! [[pipeline.stages]]
//! name = "answer"
//! node = "general"
//! template = "{{ request }}"
//! route = [{ pattern = "^[0-9]", node = "arith" }] # first match on the previous output picks the member
//!
//! [[nodes]]
//! name = "qwen"
//! url = "http://ensemble-node-qwen.default.svc.cluster.local:50051"
//! weight = 1.0
//! discovery = "dns"             # "static" (default) or "dns": every address of the host is a replica
//! dns_refresh_ms = 5000
//! model_dir = "models/arith"    # only for `ensemble up`, which starts the node itself
//! node_args = ["--deferral-head", "deferral.safetensors"] # `ensemble up`: more model-node flags
//!
//! http_listen = "0.0.0.0:8080"  # OpenAI-compatible HTTP API, /metrics, /health; "off" for none
//! ui = true                     # the live trace page on the HTTP face (GET /ui); false: not served
//! api_key_file = "/etc/ensemble/api-keys" # one bearer token per line; none: no authentication
//!
//! [tls]                         # TLS of the gRPC listener
//! cert = "/etc/ensemble/tls/tls.crt"
//! key = "/etc/ensemble/tls/tls.key"
//! client_ca = "/etc/ensemble/tls/clients-ca.crt" # optional: require client certificates
//!
//! [node_tls]                    # TLS towards the nodes (their URLs use https://)
//! ca = "/etc/ensemble/node-tls/ca.crt"
//! cert = "/etc/ensemble/node-tls/tls.crt"        # optional, with key: mutual TLS
//! key = "/etc/ensemble/node-tls/tls.key"
//! domain = "model-node"                          # optional: name the certificates carry
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::ApiKeys;
use crate::chared::CharedParams;
use crate::error::{Error, Result};
use crate::specfuse::{OnlineWeights, SpecFuseParams};
use crate::strategy::colm::CoLlmParams;
use crate::strategy::pipeline::PipelineParams;

/// How a node's address becomes replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discovery {
    /// The URL is one replica.
    #[default]
    Static,
    /// The URL's host is resolved (again every `dns_refresh_ms`); each address is a replica of the
    /// same model (a Kubernetes headless Service).
    Dns,
}

/// One ensemble member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name (for `single:NAME`, traces and errors).
    pub name: String,
    /// `http://host:port`.
    pub url: String,
    /// Default weight (> 0).
    #[serde(default = "one")]
    pub weight: f64,
    /// Static address or DNS discovery of replicas.
    #[serde(default)]
    pub discovery: Discovery,
    /// Re-resolution period for `discovery = "dns"`.
    #[serde(default = "dns_refresh_default")]
    pub dns_refresh_ms: u64,
    /// Model directory, for `ensemble up` only (ignored by `coordinator serve`).
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// More `model-node serve` flags, for `ensemble up` only (e.g. `["--deferral-head",
    /// "deferral.safetensors"]`, `["--rtd-store", "general.rtd"]`; the node resolves a relative path
    /// from its working directory, then from its model directory).
    #[serde(default)]
    pub node_args: Vec<String>,
}

fn one() -> f64 {
    1.0
}

fn dns_refresh_default() -> u64 {
    5000
}

/// SpecFuse defaults (unset: the built-in default).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFuseDefaults {
    /// Tokens per draft.
    pub segment_tokens: Option<u32>,
    /// Whether a node's score of its own draft counts.
    pub self_votes: Option<bool>,
    /// Model exit on/off.
    pub exit: Option<bool>,
    /// Exit threshold δ.
    pub exit_delta: Option<f64>,
    /// Exit temperature τ.
    pub exit_tau: Option<f64>,
    /// Rounds before exit applies.
    pub exit_warmup_rounds: Option<u64>,
    /// Nodes never dropped below this many.
    pub min_active: Option<usize>,
    /// Online weights learning rate (unset: off).
    pub online_weights_lr: Option<f64>,
    /// Drafts scored as string prefixes.
    pub string_prefix: Option<bool>,
    /// Draft scores per character.
    pub per_char: Option<bool>,
    /// The confidence gate, in (0, 1] (unset = off).
    pub gate: Option<f64>,
}

/// CharED defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CharEdDefaults {
    /// 0 = greedy.
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// The published K = 1 variant.
    pub published: Option<bool>,
    /// Speculative CharED's draft length (0 = one call per character).
    pub draft_chars: Option<u32>,
    /// The confidence gate, in (0, 1] (unset = off).
    pub gate: Option<f64>,
    /// Per-context weights: w_i · exp(−β · H_i) (0 = the weights alone).
    pub entropy_beta: Option<f64>,
}

/// The file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// gRPC listen address.
    pub listen: Option<SocketAddr>,
    /// Per node RPC deadline.
    pub deadline_ms: Option<u64>,
    /// Retries of a node call refused or unavailable (another replica when there is one).
    pub retries: Option<u32>,
    /// Consecutive failed calls that eject a member (0: never).
    pub eject_after: Option<u32>,
    /// First ejection time of a member, milliseconds.
    pub eject_ms: Option<u64>,
    /// Strategy for requests that name none.
    pub default_strategy: Option<String>,
    /// Answer length for clients that give none.
    pub max_chars: Option<u32>,
    /// Requests served at once; more are refused as overload.
    pub max_concurrent_requests: Option<usize>,
    /// Members that must be up for the coordinator to report ready.
    pub min_healthy_nodes: Option<usize>,
    /// Background health probe period, milliseconds (0: none).
    pub probe_ms: Option<u64>,
    /// Whether the HTTP face serves the live trace page (`GET /ui`; default true).
    pub ui: Option<bool>,
    /// Most bytes in one message.
    pub max_message_bytes: Option<usize>,
    /// Most messages per conversation.
    pub max_messages: Option<usize>,
    /// Most prompt bytes in all.
    pub max_prompt_bytes: Option<usize>,
    /// Largest encoded request (gRPC message, HTTP body).
    pub max_request_bytes: Option<usize>,
    /// SpecFuse defaults.
    #[serde(default)]
    pub specfuse: SpecFuseDefaults,
    /// CharED defaults.
    #[serde(default)]
    pub chared: CharEdDefaults,
    /// Co-LLM defaults.
    #[serde(default)]
    pub colm: CoLlmParams,
    /// FSLM pipeline defaults.
    #[serde(default)]
    pub pipeline: PipelineParams,
    /// The members.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    /// HTTP listen address (OpenAI API, metrics, health), or `off`.
    pub http_listen: Option<String>,
    /// Bearer tokens, one per line.
    pub api_key_file: Option<PathBuf>,
    /// TLS of the gRPC listener.
    pub tls: Option<ServerTlsFile>,
    /// TLS towards the nodes.
    pub node_tls: Option<NodeTlsFile>,
}

/// `[tls]`: the gRPC listener's certificate, and the CA of required client certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFile {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA of client certificates (PEM): when set, clients must present one.
    pub client_ca: Option<PathBuf>,
}

impl From<&ServerTlsFile> for ensemble_proto::tls::ServerTls {
    fn from(t: &ServerTlsFile) -> Self {
        Self {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        }
    }
}

/// `[node_tls]`: how the coordinator reaches `https://` nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTlsFile {
    /// CA of the nodes' certificates (PEM).
    pub ca: PathBuf,
    /// Client certificate for mutual TLS (PEM).
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// Server name to verify (default: the URL's host).
    pub domain: Option<String>,
}

impl From<&NodeTlsFile> for ensemble_proto::tls::ClientTls {
    fn from(t: &NodeTlsFile) -> Self {
        Self {
            ca: t.ca.clone(),
            cert: t.cert.clone(),
            key: t.key.clone(),
            domain: t.domain.clone(),
        }
    }
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> std::result::Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: invalid config: {e}", path.display()))
    }
}

/// Everything a coordinator runs with (the file after overrides).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The members.
    pub nodes: Vec<NodeConfig>,
    /// Per node RPC deadline.
    pub deadline: Duration,
    /// Retries of a refused/unavailable node call.
    pub retries: u32,
    /// Consecutive failed calls (deadline, unreachable, node fault) that eject a member (0: never).
    pub eject_after: u32,
    /// First ejection time of a member.
    pub eject_time: Duration,
    /// Strategy for requests that name none.
    pub default_strategy: String,
    /// Answer length for clients that give none.
    pub max_chars: u32,
    /// Requests served at once; more are refused with RESOURCE_EXHAUSTED (HTTP 429).
    pub max_concurrent_requests: usize,
    /// Members that must be up (not ejected) for readiness to be SERVING.
    pub min_healthy_nodes: usize,
    /// Background health probe period (zero: none).
    pub probe_every: Duration,
    /// Input size limits, checked before any node is called.
    pub input: ensemble_proto::limits::InputLimits,
    /// SpecFuse defaults.
    pub specfuse: SpecFuseParams,
    /// CharED defaults.
    pub chared: CharedParams,
    /// Co-LLM defaults.
    pub colm: CoLlmParams,
    /// FSLM pipeline defaults.
    pub pipeline: PipelineParams,
    /// TLS towards `https://` nodes.
    pub node_tls: Option<ensemble_proto::tls::ClientTls>,
    /// Bearer tokens clients must present (empty: no authentication).
    pub api_keys: ApiKeys,
    /// Whether the HTTP face serves the live trace page (`GET /ui`).
    pub ui: bool,
}

impl Settings {
    /// Built-in defaults over `nodes`.
    pub fn new(nodes: Vec<NodeConfig>) -> Self {
        Self {
            nodes,
            deadline: Duration::from_secs(30),
            retries: 1,
            eject_after: 1,
            eject_time: Duration::from_secs(5),
            default_strategy: "specfuse".into(),
            max_chars: 256,
            max_concurrent_requests: 256,
            min_healthy_nodes: 1,
            probe_every: Duration::from_secs(2),
            input: ensemble_proto::limits::InputLimits::default(),
            specfuse: SpecFuseParams::default(),
            chared: CharedParams::default(),
            colm: CoLlmParams::default(),
            pipeline: PipelineParams::default(),
            node_tls: None,
            api_keys: ApiKeys::default(),
            ui: true,
        }
    }

    /// The file's values over the built-in defaults; checks them.
    pub fn from_file(file: &FileConfig) -> Result<Self> {
        let mut s = Self::new(file.nodes.clone());
        if let Some(d) = file.deadline_ms {
            s.deadline = Duration::from_millis(d);
        }
        if let Some(r) = file.retries {
            s.retries = r;
        }
        if let Some(n) = file.eject_after {
            s.eject_after = n;
        }
        if let Some(ms) = file.eject_ms {
            s.eject_time = Duration::from_millis(ms);
        }
        if let Some(st) = &file.default_strategy {
            s.default_strategy = st.clone();
        }
        if let Some(m) = file.max_chars {
            s.max_chars = m;
        }
        if let Some(n) = file.max_concurrent_requests {
            s.max_concurrent_requests = n;
        }
        if let Some(n) = file.min_healthy_nodes {
            s.min_healthy_nodes = n;
        }
        if let Some(ms) = file.probe_ms {
            s.probe_every = Duration::from_millis(ms);
        }
        if let Some(ui) = file.ui {
            s.ui = ui;
        }
        let i = &mut s.input;
        for (v, f) in [
            (&mut i.max_message_bytes, file.max_message_bytes),
            (&mut i.max_messages, file.max_messages),
            (&mut i.max_prompt_bytes, file.max_prompt_bytes),
            (&mut i.max_request_bytes, file.max_request_bytes),
        ] {
            if let Some(n) = f {
                *v = n;
            }
        }
        s.node_tls = file.node_tls.as_ref().map(Into::into);
        if let Some(p) = &file.api_key_file {
            s.api_keys = ApiKeys::from_file(p).map_err(|e| Error::InvalidParameter {
                name: "api_key_file".into(),
                value: e,
                allowed: "a readable file with one key per line",
            })?;
        }
        let f = &file.specfuse;
        let p = &mut s.specfuse;
        if let Some(v) = f.segment_tokens {
            p.segment_tokens = v;
        }
        if let Some(v) = f.self_votes {
            p.self_votes = v;
        }
        if let Some(v) = f.exit {
            p.exit.enabled = v;
        }
        if let Some(v) = f.exit_delta {
            p.exit.delta = v;
        }
        if let Some(v) = f.exit_tau {
            p.exit.tau = v;
        }
        if let Some(v) = f.exit_warmup_rounds {
            p.exit.warmup_rounds = v;
        }
        if let Some(v) = f.min_active {
            p.exit.min_active = v;
        }
        if let Some(lr) = f.online_weights_lr {
            p.online_weights = Some(OnlineWeights { lr });
        }
        if let Some(v) = f.string_prefix {
            p.string_prefix = v;
        }
        if let Some(v) = f.per_char {
            p.per_char = v;
        }
        if f.gate.is_some() {
            p.gate = f.gate;
        }
        let c = &file.chared;
        if let Some(v) = c.temperature {
            s.chared.temperature = v;
        }
        if let Some(v) = c.top_p {
            s.chared.top_p = v;
        }
        if let Some(v) = c.seed {
            s.chared.seed = v;
        }
        if let Some(v) = c.published {
            s.chared.published = v;
        }
        if let Some(v) = c.draft_chars {
            s.chared.draft_chars = v;
        }
        if c.gate.is_some() {
            s.chared.gate = c.gate;
        }
        if let Some(v) = c.entropy_beta {
            s.chared.entropy_beta = v;
        }
        s.colm = file.colm.clone();
        s.pipeline = file.pipeline.clone();
        s.check()?;
        Ok(s)
    }

    /// Checks the values a request cannot fix.
    pub fn check(&self) -> Result<()> {
        if self.nodes.is_empty() {
            return Err(Error::NoNodes);
        }
        let bad = |name: &str, value: String, allowed: &'static str| Error::InvalidParameter {
            name: name.to_owned(),
            value,
            allowed,
        };
        for n in &self.nodes {
            if !(n.weight.is_finite() && n.weight > 0.0) {
                return Err(bad(
                    &format!("node {} weight", n.name),
                    n.weight.to_string(),
                    "finite and > 0",
                ));
            }
            if n.discovery == Discovery::Dns && n.dns_refresh_ms == 0 {
                return Err(bad(&format!("node {} dns_refresh_ms", n.name), "0".into(), "> 0"));
            }
        }
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad("node name", w[0].to_owned(), "unique names"));
        }
        if self.deadline.is_zero() {
            return Err(bad("deadline_ms", "0".into(), "> 0"));
        }
        if self.max_chars == 0 || self.max_chars > crate::core::MAX_CHARS {
            return Err(bad("max_chars", self.max_chars.to_string(), "1..=65536"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(bad("max_concurrent_requests", "0".into(), ">= 1"));
        }
        if self.min_healthy_nodes > self.nodes.len() {
            return Err(bad(
                "min_healthy_nodes",
                self.min_healthy_nodes.to_string(),
                "at most the number of nodes",
            ));
        }
        if let Err(e) = self.input.validate() {
            return Err(bad("max_*_bytes / max_messages", e, ">= 1"));
        }
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        if !crate::core::is_strategy(&self.default_strategy, &names) {
            return Err(Error::InvalidParameter {
                name: "default_strategy".into(),
                value: self.default_strategy.clone(),
                allowed: "a strategy (specfuse, chared, colm, pipeline) or \"single:NAME\" of a configured node",
            });
        }
        if self.default_strategy == "pipeline" && self.pipeline.stages.is_empty() {
            return Err(Error::bad_field(
                "default_strategy",
                "\"pipeline\" needs [[pipeline.stages]] in the configuration",
            ));
        }
        self.colm.validate()?;
        for (field, name) in self
            .colm
            .base
            .iter()
            .map(|b| ("colm.base", b))
            .chain(self.colm.assistants.iter().map(|a| ("colm.assistants", a)))
            .chain(self.pipeline.fallback.iter().map(|f| ("pipeline.fallback", f)))
            .chain(
                self.pipeline
                    .stages
                    .iter()
                    .map(|s| ("pipeline.stages.node", &s.node)),
            )
        {
            if !names.contains(name) {
                return Err(Error::bad_field(
                    field,
                    format!("unknown node {name:?}; configured: {names:?}"),
                ));
            }
        }
        let mut sf = self.specfuse.clone();
        sf.weights = None;
        sf.validate()?;
        let mut ch = self.chared.clone();
        ch.weights = None;
        ch.validate()?;
        Ok(())
    }
}

/// Parses `NAME=URL[@WEIGHT]` (the `--node` flag).
pub fn parse_node(s: &str) -> std::result::Result<NodeConfig, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("node {s:?}: expected NAME=URL[@WEIGHT]"))?;
    let (url, weight) = match rest.rsplit_once('@') {
        Some((u, w)) => (
            u,
            w.parse::<f64>()
                .map_err(|_| format!("node {name}: weight {w:?} is not a number"))?,
        ),
        None => (rest, 1.0),
    };
    Ok(NodeConfig {
        name: name.to_owned(),
        url: url.to_owned(),
        weight,
        discovery: Discovery::Static,
        dns_refresh_ms: dns_refresh_default(),
        model_dir: None,
        node_args: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_override_defaults_and_are_checked() {
        let f: FileConfig = toml::from_str(
            r#"
            deadline_ms = 500
            retries = 3
            default_strategy = "chared"
            [specfuse]
            segment_tokens = 4
            exit_delta = 0.3
            [chared]
            published = true
            [[nodes]]
            name = "a"
            url = "http://127.0.0.1:1"
            discovery = "dns"
            [[nodes]]
            name = "b"
            url = "http://127.0.0.1:2"
            weight = 2.0
            "#,
        )
        .expect("parses");
        let s = Settings::from_file(&f).expect("valid");
        assert_eq!(s.deadline, Duration::from_millis(500));
        assert_eq!((s.retries, s.default_strategy.as_str()), (3, "chared"));
        assert_eq!((s.specfuse.segment_tokens, s.specfuse.exit.delta), (4, 0.3));
        assert!(s.chared.published);
        assert_eq!(s.nodes[0].discovery, Discovery::Dns);

        for (bad, what) in [
            ("default_strategy = \"single:zz\"", "default_strategy"),
            ("max_chars = 0", "max_chars"),
            ("[specfuse]\nexit_delta = 2.0", "delta"),
        ] {
            let text = format!("{bad}\n[[nodes]]\nname = \"a\"\nurl = \"http://x:1\"\n");
            let f: FileConfig = toml::from_str(&text).expect("parses");
            let e = Settings::from_file(&f).expect_err(bad).to_string();
            assert!(e.contains(what), "{e}");
        }
        let dup =
            "[[nodes]]\nname = \"a\"\nurl = \"http://x:1\"\n[[nodes]]\nname = \"a\"\nurl = \"http://x:2\"\n";
        assert!(Settings::from_file(&toml::from_str(dup).expect("parses")).is_err());
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }

    #[test]
    fn colm_and_pipeline_sections_parse_and_name_configured_members() {
        let base =
            "[[nodes]]\nname = \"a\"\nurl = \"http://x:1\"\n[[nodes]]\nname = \"b\"\nurl = \"http://x:2\"\n";
        let f: FileConfig = toml::from_str(&format!(
            "default_strategy = \"pipeline\"\n[colm]\nbase = \"a\"\neta = 0.4\nhandoff = \"word\"\n\
             [pipeline]\nfallback = \"b\"\n[[pipeline.stages]]\nname = \"d\"\nnode = \"a\"\n\
             template = \"{{{{ request }}}}\"\nroute = [{{ pattern = \"x\", node = \"b\" }}]\n{base}"
        ))
        .expect("parses");
        let s = Settings::from_file(&f).expect("valid");
        assert_eq!(s.colm.base.as_deref(), Some("a"));
        assert_eq!(s.colm.handoff, crate::strategy::colm::Handoff::Word);
        assert_eq!(s.pipeline.stages[0].route[0].node, "b");
        for (bad, what) in [
            ("[colm]\neta = 1.0", "colm.eta"),
            ("[colm]\nbase = \"zz\"", "colm.base"),
            ("[colm]\nassistants = [\"zz\"]", "colm.assistants"),
            ("[pipeline]\nfallback = \"zz\"", "pipeline.fallback"),
            ("[colm]\nhandoff = \"line\"", "handoff"),
        ] {
            let e = match toml::from_str::<FileConfig>(&format!("{bad}\n{base}")) {
                Ok(f) => Settings::from_file(&f).expect_err(bad).to_string(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn node_flag() {
        let n = parse_node("a=http://h:1@2.5").expect("valid");
        assert_eq!(
            (n.name.as_str(), n.url.as_str(), n.weight),
            ("a", "http://h:1", 2.5)
        );
        assert!(parse_node("nourl").is_err());
        assert!(parse_node("a=http://h:1@x").is_err());
    }
}
