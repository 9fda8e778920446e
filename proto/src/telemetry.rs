//! Logs and distributed traces, set up the same way by both binaries.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). Traces are exported over OTLP/gRPC
//! when the standard OpenTelemetry variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, unless `OTEL_TRACES_EXPORTER=none` or
//! `OTEL_SDK_DISABLED=true`); the exporter itself reads the rest (`OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`...). When off, no OpenTelemetry layer is installed and [`inject`] /
//! [`set_parent`] return at once: tracing costs what plain logging costs.
//!
//! The trace context crosses every gRPC hop as W3C `traceparent` / `tracestate` metadata: the
//! coordinator [`inject`]s it into each node call, the node [`set_parent`]s its RPC span from it.
//!
//! Numeric span fields are recorded as `i64` (or `f64`): OpenTelemetry has no unsigned integers,
//! and the bridge exports a `u64` field as a string.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether the environment asks for OTLP trace export.
pub fn otlp_requested() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let is = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x.trim().eq_ignore_ascii_case(v));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_TRACES_EXPORTER", "none")
        && !is("OTEL_SDK_DISABLED", "true")
}

/// Whether spans are being exported (set by [`init`], paused by [`Telemetry::pause`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Pauses (`true`) or resumes span export: while paused no span reaches the exporter and no
    /// trace context is sent on. For measuring what export costs in one process (the benchmarks
    /// alternate requests with and without it); spans already open keep their state.
    pub fn pause(&self, paused: bool) {
        if self.provider.is_some() {
            EXPORTING.store(!paused, Ordering::Relaxed);
        }
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace export: shutdown: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber: logs to stderr, plus OTLP export when [`otlp_requested`].
/// `service` is the `service.name` unless `OTEL_SERVICE_NAME` says otherwise. Must run inside a
/// Tokio runtime when export is on (the gRPC exporter's connection lives there).
pub fn init(service: &str) -> Result<Telemetry, String> {
    let export = if otlp_requested() {
        Export::FromEnv
    } else {
        Export::Off
    };
    init_with(service, export)
}

/// Where [`init_with`] sends spans.
#[derive(Debug, Clone, Copy)]
pub enum Export<'a> {
    /// Nowhere: logs only.
    Off,
    /// To the endpoint the `OTEL_*` variables give.
    FromEnv,
    /// To this OTLP/gRPC endpoint (the other `OTEL_*` variables still apply).
    To(&'a str),
}

/// [`init`] with the export decided by the caller (benchmarks, embedding programs).
pub fn init_with(service: &str, export: Export<'_>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: container logs, journald and files get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let endpoint = match export {
        Export::To(e) => Some(e),
        Export::FromEnv => None,
        Export::Off => {
            tracing_subscriber::registry()
                .with(filter)
                .with(fmt)
                .try_init()
                .map_err(|e| e.to_string())?;
            return Ok(Telemetry { provider: None });
        }
    };
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(e) = endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        builder = builder.with_endpoint(e.to_owned());
    }
    let exporter = builder.build().map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer(service.to_owned());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(
            // Per span: the name, the fields and the timing. Left out: the busy/idle accounting (two
            // clock reads on every poll of an instrumented future), the thread, source-location and
            // target attributes (337 -> 154 protobuf bytes per span), and the activation of an
            // OpenTelemetry context on every poll (`inject` reads a span's context directly).
            tracing_opentelemetry::layer()
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false)
                .with_target(false)
                .with_context_activation(false)
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|_, _| exporting())),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
    })
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context into outgoing gRPC metadata (`traceparent`, `tracestate`); when
/// `span` is disabled (a level the filter leaves out), the current span's.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    if !exporting() {
        return;
    }
    let cx = if span.is_disabled() {
        tracing::Span::current().context()
    } else {
        span.context()
    };
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Makes the trace context of incoming gRPC metadata, if any, the parent of `span`.
pub fn set_parent(span: &tracing::Span, metadata: &MetadataMap) {
    if !exporting() || metadata.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

    #[test]
    fn trace_context_round_trips_through_metadata() {
        let sc = SpanContext::new(
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128),
            SpanId::from(0x00f067aa0ba902b7u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let mut md = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut md));
        assert_eq!(
            md.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = TraceContextPropagator::new().extract(&MetadataExtractor(&md));
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
    }
}
