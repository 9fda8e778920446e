//! Building a node from configuration: open the model directory, pick device and dtype, load the
//! weights, and describe the result ([`ensemble_proto::v1::InfoResponse`]).

use candle_core::{DType, Device};
use ensemble_proto::v1 as pb;

use crate::config::{DTypeArg, DeferralArgs, LimitArgs, ModelArgs, RtdArgs};
use crate::deferral::DeferralHead;
use crate::engine::text::TextCodec;
use crate::engine::{Engine, EngineLimits};
use crate::error::{Error, Result};
use crate::modeldir::ModelFiles;
use crate::vocab::{TokenizerKind, Vocab};

/// Largest default context when the config allows more (bounds the rotary tables' memory).
pub const DEFAULT_CONTEXT_CAP: usize = 32_768;

/// Parses `cpu` / `cuda:N`.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::ModelDir(format!("device {s:?}: expected cuda:N")))?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(|e| {
                Error::ModelDir(format!(
                    "device {s}: {e} (CUDA needs a build with `--features cuda` and a GPU)"
                ))
            })
        }
        s => Err(Error::ModelDir(format!(
            "device {s:?}: expected `cpu` or `cuda:N`"
        ))),
    }
}

fn dtype(arg: DTypeArg, device: &Device) -> DType {
    match arg {
        DTypeArg::Auto if device.is_cpu() => DType::F32,
        DTypeArg::Auto => DType::BF16,
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// A loaded model ready to serve, and its description.
pub struct Loaded {
    /// The engine (not yet on its thread).
    pub engine: Engine,
    /// What Info answers.
    pub info: pb::InfoResponse,
}

/// What an RTD store must have been built for to serve this model.
pub fn store_model(files: &ModelFiles, vocab: &Vocab) -> crate::rtd::StoreModel {
    crate::rtd::StoreModel {
        architecture: files.config.arch.name().into(),
        hidden_size: files.config.hidden_size,
        vocab_size: files.config.vocab_size,
        vocab_hash: crate::rtd::vocab_hash(vocab, files.config.vocab_size),
        model_id: String::new(),
    }
}

/// Loads the model described by `args` with `limits` (no deferral head).
pub fn load(args: &ModelArgs, limits: &LimitArgs) -> Result<Loaded> {
    load_with(args, limits, &DeferralArgs::default())
}

/// Loads the model described by `args` with `limits` and, when `deferral` names one, its Co-LLM
/// deferral head (a head that does not fit the model is a start-up error naming the file).
pub fn load_with(args: &ModelArgs, limits: &LimitArgs, deferral: &DeferralArgs) -> Result<Loaded> {
    load_serving(args, limits, deferral, &RtdArgs::default())
}

/// [`load_with`], and the RTD reference store `rtd` names (a store built for another model, or a
/// file that is not a store, is a start-up error naming the file).
pub fn load_serving(
    args: &ModelArgs,
    limits: &LimitArgs,
    deferral: &DeferralArgs,
    rtd: &RtdArgs,
) -> Result<Loaded> {
    let files = ModelFiles::open(&args.model_dir)?;
    let device = device(&args.device)?;
    let dtype = dtype(args.dtype, &device);
    let max_context = args
        .max_context
        .unwrap_or(files.config.max_position_embeddings.min(DEFAULT_CONTEXT_CAP))
        .min(files.config.max_position_embeddings)
        .max(2);
    let head = match &deferral.deferral_head {
        Some(file) => {
            let path = crate::deferral::resolve_path(file, &args.model_dir);
            let head = DeferralHead::load(&path)?;
            head.check_hidden(&path, files.config.hidden_size)?;
            Some((path, head))
        }
        None => None,
    };
    let mut model = files.load_model(&device, dtype, max_context)?;
    if model.is_quantized() {
        model.warm_up().map_err(|e| {
            Error::ModelDir(format!(
                "{}: the first forward pass failed: {}",
                args.model_dir.display(),
                crate::error::candle_message(&e)
            ))
        })?;
    }
    if let Some((path, head)) = &head {
        let (g, b) = head.tensors(&device)?;
        model.set_deferral(&g, &b).map_err(|e| {
            Error::DeferralHead(format!(
                "{}: {}",
                path.display(),
                crate::error::candle_message(&e)
            ))
        })?;
    }
    let vocab = Vocab::from_tokenizer(&files.tokenizer, files.config.vocab_size, &files.eos_ids)?;
    let store = match &rtd.rtd_store {
        Some(file) if rtd.rtd_lambda > 0.0 => {
            let path = crate::deferral::resolve_path(file, &args.model_dir);
            let params = crate::rtd::RtdParams {
                lambda: rtd.rtd_lambda,
                k: rtd.rtd_k,
                temperature: rtd.rtd_temperature,
                max_distance: rtd.rtd_max_distance,
            };
            params
                .validate()
                .map_err(|e| Error::RtdStore(format!("{}: {e}", path.display())))?;
            let store = crate::rtd::Store::load(&path)?;
            store.check_model(&path, &store_model(&files, &vocab))?;
            let mixer = crate::rtd::Rtd::new(&store, params, &device).map_err(|e| {
                Error::RtdStore(format!(
                    "{}: {}",
                    path.display(),
                    crate::error::candle_message(&e)
                ))
            })?;
            model.set_rtd(std::sync::Arc::new(mixer));
            Some((path, store, params))
        }
        _ => None,
    };
    let kind = match vocab.kind() {
        TokenizerKind::ByteLevel => pb::TokenizerKind::ByteLevel,
        TokenizerKind::SentencePiece => pb::TokenizerKind::SentencePiece,
        TokenizerKind::Plain => pb::TokenizerKind::Plain,
    };
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        // The directory's name; for a GGUF file its stem (`model.gguf`: its directory's name).
        let p = &args.model_dir;
        let named = if p.is_file() && p.file_stem().is_some_and(|s| s != "model") {
            p.file_stem()
        } else if p.is_file() {
            p.parent().and_then(|d| d.file_name())
        } else {
            p.file_name()
        };
        named
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let engine_limits = EngineLimits {
        max_context,
        max_sessions: limits.max_sessions,
        kv_budget_bytes: limits.kv_cache_mb.saturating_mul(1 << 20),
        queue_capacity: limits.queue,
    };
    let info = pb::InfoResponse {
        model_id,
        architecture: files.config.arch.name().into(),
        vocab_size: files.config.vocab_size as u32,
        tokenizer_kind: kind as i32,
        max_context_tokens: max_context as u32,
        eos_token_ids: files.eos_ids.clone(),
        eos_tokens: files
            .eos_ids
            .iter()
            .filter_map(|&id| files.tokenizer.id_to_token(id))
            .collect(),
        has_chat_template: files.template.has_template(),
        device: args.device.clone(),
        dtype: dtype_name(dtype).into(),
        parameters: files.config.parameter_count(),
        max_sessions: limits.max_sessions as u32,
        kv_cache_budget_bytes: engine_limits.kv_budget_bytes as u64,
        kernel_threads: crate::threads::current() as u32,
        deferral_head: head.as_ref().map(|(path, h)| pb::DeferralHeadInfo {
            assistants: h.assistants.clone(),
            eta: h.eta,
            path: path.display().to_string(),
        }),
        rtd_store: store.as_ref().map(|(path, st, p)| pb::RtdStoreInfo {
            path: path.display().to_string(),
            entries: st.len() as u64,
            bytes: (4 * st.keys.len() + 4 * st.values.len()) as u64,
            lambda: p.lambda,
            k: p.k as u32,
            temperature: p.temperature,
            examples: st.examples as u64,
            max_distance: p.max_distance,
        }),
        // Load fields: filled in by the service from the engine's counters on every Info.
        ..Default::default()
    };
    let ModelFiles {
        tokenizer,
        template,
        bos,
        add_bos,
        ..
    } = files;
    let codec = TextCodec::new(tokenizer, vocab, template, bos.map(|b| b.1), add_bos)?;
    Ok(Loaded {
        engine: Engine::new(model, codec, engine_limits),
        info,
    })
}
