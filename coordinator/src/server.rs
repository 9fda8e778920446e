//! Serving the `Ensemble` API: health (`grpc.health.v1`), reflection (v1 and v1alpha) and the
//! service, with a drain on shutdown (health turns NOT_SERVING, in-flight requests finish).

use std::future::Future;
use std::time::Duration;

use ensemble_proto::v1::ensemble_server::EnsembleServer;
use tokio::net::TcpListener;

use crate::service::{Coordinator, EnsembleService};

/// How long in-flight requests may run after shutdown starts.
pub const DRAIN_GRACE: Duration = Duration::from_secs(60);

/// Serves `coordinator` on `listener` until `shutdown` completes, then drains for at most
/// [`DRAIN_GRACE`].
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EnsembleServer<EnsembleService>>().await;
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
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(EnsembleServer::new(EnsembleService::new(coordinator)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
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
            },
        );
    tokio::select! {
        r = server => r?,
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
