//! The gRPC server: the `ModelNode` service, `grpc.health.v1` and server reflection (v1 and v1alpha)
//! on one listener (TLS, optionally requiring client certificates), Prometheus `/metrics` on another,
//! with a drain on shutdown: health goes NOT_SERVING, in-flight calls finish, then the engine thread
//! stops.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ensemble_proto::limits::InputLimits;
use ensemble_proto::v1::model_node_server::ModelNodeServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::chars::CharOptions;
use crate::error::{Error, Result};
use crate::node::Loaded;
use crate::service::NodeService;

/// The health service name clients probe.
pub const SERVICE_NAME: &str = "ensemble.v1.ModelNode";

/// How a node serves, beyond the model and its listener.
#[derive(Default)]
pub struct ServeOptions {
    /// How long in-flight calls may run after shutdown starts.
    pub grace: Duration,
    /// TLS for the gRPC listener (with `client_ca`: mutual TLS, client certificates required).
    pub tls: Option<ensemble_proto::tls::ServerTls>,
    /// Where `/metrics` is served (none: not served).
    pub metrics: Option<TcpListener>,
    /// Input size limits (the gRPC message limit among them).
    pub input: InputLimits,
}

/// Serves `node` on `listener` until `shutdown` resolves, then drains for at most `grace`.
pub async fn run(
    listener: TcpListener,
    node: Loaded,
    char_defaults: CharOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    let opts = ServeOptions {
        grace,
        ..ServeOptions::default()
    };
    run_with(listener, node, char_defaults, shutdown, opts).await
}

/// [`run`] with every option.
pub async fn run_with(
    listener: TcpListener,
    node: Loaded,
    char_defaults: CharOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServeOptions,
) -> Result<()> {
    let grace = opts.grace;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        let config = tls.config().map_err(Error::Server)?;
        builder = builder
            .tls_config(config)
            .map_err(|e| Error::Server(format!("TLS: {e}")))?;
    }
    let (engine, engine_thread) = node.engine.spawn()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ModelNodeServer<NodeService>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ensemble_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err = |e: tonic_reflection::server::Error| Error::Server(format!("reflection: {e}"));
    let refl_v1 = reflection().build_v1().map_err(reflection_err)?;
    let refl_v1a = reflection().build_v1alpha().map_err(reflection_err)?;

    let service = NodeService::new(engine, node.info, char_defaults).with_input(opts.input);
    let (metrics_stop, metrics_stopped) = tokio::sync::watch::channel(false);
    let serving = Arc::new(AtomicBool::new(true));
    if let Some(l) = opts.metrics {
        let m = service.metrics().clone();
        let serving = serving.clone();
        let mut stopped = metrics_stopped.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve(m, serving, l, stop).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let svc = ModelNodeServer::new(service)
        .max_decoding_message_size(opts.input.max_request_bytes)
        .max_encoding_message_size(opts.input.max_request_bytes.max(16 << 20));

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let (force_tx, force_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = health.clone();
    let draining = serving.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: health NOT_SERVING, draining in-flight calls");
        draining.store(false, Ordering::Relaxed);
        reporter.set_not_serving::<ModelNodeServer<NodeService>>().await;
        reporter.set_service_status("", ServingStatus::NotServing).await;
        let _ = drain_tx.send(());
        tokio::time::sleep(grace).await;
        let _ = force_tx.send(());
    });
    let server = builder
        .layer(tower::util::MapResponseLayer::new(
            ensemble_proto::faults::client_fault,
        ))
        .add_service(health_service)
        .add_service(refl_v1)
        .add_service(refl_v1a)
        .add_service(svc)
        .serve_with_incoming_shutdown(ensemble_proto::net::incoming(listener), async {
            let _ = drain_rx.await;
        });
    let outcome = tokio::select! {
        r = server => r.map_err(|e| Error::Server(e.to_string())),
        Ok(()) = force_rx => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over: dropping unfinished calls");
            Ok(())
        }
    };
    let _ = metrics_stop.send(true);
    // Dropping the last engine handle ends the engine thread once its current job is done.
    drop(engine_thread);
    outcome
}
