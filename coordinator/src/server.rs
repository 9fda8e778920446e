//! Serving the `Ensemble` API: health (`grpc.health.v1`), reflection (v1 and v1alpha) and the
//! service (behind the bearer-token check when API keys are configured), optionally over TLS, with
//! the HTTP face ([`crate::http`]) beside it, and a drain on shutdown (health turns NOT_SERVING,
//! in-flight requests finish).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ensemble_proto::v1::ensemble_server::EnsembleServer;
use tokio::net::TcpListener;

use crate::service::{Coordinator, EnsembleService};

/// How the coordinator serves, beyond its gRPC listener.
#[derive(Default)]
pub struct ServeOptions {
    /// TLS of the gRPC listener (with `client_ca`: client certificates required) and, with the same
    /// certificate but no client certificates, of the HTTP face.
    pub tls: Option<ensemble_proto::tls::ServerTls>,
    /// Where the HTTP face (OpenAI API, `/metrics`, `/health`) listens; none: not served.
    pub http: Option<TcpListener>,
}

/// How long in-flight requests may run after shutdown starts.
pub const DRAIN_GRACE: Duration = Duration::from_secs(60);

/// Serves `coordinator` on `listener` until `shutdown` completes, then drains for at most
/// [`DRAIN_GRACE`].
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_with(coordinator, listener, shutdown, ServeOptions::default()).await
}

/// [`serve`] with TLS and the HTTP face.
pub async fn serve_with(
    coordinator: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServeOptions,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let coordinator = Arc::new(coordinator);
    let max_request = coordinator.settings().input.max_request_bytes;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.config()?)?;
    }
    let (http_stop, http_stopped) = tokio::sync::watch::channel(false);
    let http_stop = Arc::new(http_stop);
    let mut http_task = None;
    if let Some(l) = opts.http {
        let c = coordinator.clone();
        // Built now, so that a certificate rustls refuses fails the start, not the HTTP task.
        let http_tls = opts
            .tls
            .as_ref()
            .map(crate::http::tls::server_config)
            .transpose()?;
        let mut stopped = http_stopped.clone();
        http_task = Some(tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let served = match http_tls {
                Some(t) => crate::http::serve_tls(c, l, t, stop).await,
                None => crate::http::serve(c, l, stop).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP API stopped");
            }
        }));
    }
    let http_stop_on_drain = http_stop.clone();
    let keys = coordinator.settings().api_keys.clone();
    let metrics = coordinator.metrics().clone();
    let check = move |req: tonic::Request<()>| {
        let auth = req.metadata().get("authorization").map(|v| v.as_bytes());
        match keys.check(auth) {
            Ok(()) => Ok(req),
            Err(refusal) => {
                metrics.auth_failed("grpc");
                tracing::info!(api = "grpc", reason = %refusal, "request refused");
                Err(tonic::Status::unauthenticated(refusal.to_string()))
            }
        }
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EnsembleServer<EnsembleService>>().await;
    // Readiness (the `ensemble.v1.Ensemble` service) follows the members' health probe; liveness
    // (the empty service name) stays SERVING until the drain.
    let every = coordinator.settings().probe_every;
    if !every.is_zero() {
        let reporter = health.clone();
        let draining = http_stop.subscribe();
        let on_ready = move |ready: bool| -> futures::future::BoxFuture<'static, ()> {
            let reporter = reporter.clone();
            let draining = *draining.borrow();
            Box::pin(async move {
                match (ready, draining) {
                    (_, true) => {}
                    (true, false) => reporter.set_serving::<EnsembleServer<EnsembleService>>().await,
                    (false, false) => {
                        reporter
                            .set_not_serving::<EnsembleServer<EnsembleService>>()
                            .await
                    }
                }
            })
        };
        tokio::spawn(crate::probe::run(
            coordinator.clone(),
            every,
            http_stop.subscribe(),
            on_ready,
        ));
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ensemble_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ensemble_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let reporter = health.clone();
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .layer(tower::util::MapResponseLayer::new(
            ensemble_proto::faults::client_fault,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            EnsembleServer::new(EnsembleService::shared(coordinator.clone()))
                .max_decoding_message_size(max_request),
            check,
        ))
        .serve_with_incoming_shutdown(ensemble_proto::net::incoming(listener), async move {
            shutdown.await;
            // Stop routing first, then let tonic finish the in-flight requests.
            tracing::info!("shutdown requested: health NOT_SERVING, draining");
            reporter
                .set_not_serving::<EnsembleServer<EnsembleService>>()
                .await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let _ = draining_tx.send(());
            let _ = http_stop_on_drain.send(true);
        });
    // Both faces drain: the gRPC server finishes its requests, the HTTP server its own.
    let both = async {
        let r = server.await;
        let _ = http_stop.send(true);
        if let Some(h) = http_task {
            let _ = h.await;
        }
        r
    };
    tokio::select! {
        r = both => r?,
        _ = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(DRAIN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!(grace_s = DRAIN_GRACE.as_secs(), "drain grace over; dropping the requests still running"),
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
