//! The background health probe: every `probe_ms` each member's replicas are asked for `Info` with a
//! short timeout. A member none of whose replicas answers is down: the coordinator's readiness turns
//! NOT_SERVING (HTTP `/ready` 503) while fewer than `min_healthy_nodes` are up; a down member that its
//! failed calls ejected stays ejected while its probes fail, and the first probe that answers
//! reinstates it (before its ejection time is over). Each answer is kept as the member's last `Info`,
//! which strategies plan from (Co-LLM checks the base's deferral head before calling any node).

use std::sync::Arc;
use std::time::Duration;

use ensemble_proto::v1 as pb;
use tokio::sync::watch;

use crate::core::Coordinator;

/// Asks one member's replicas for `Info`; `Err` is the cause when none answered in `timeout`.
pub(crate) async fn probe_member(
    replicas: &crate::replicas::Replicas,
    timeout: Duration,
) -> Result<pb::InfoResponse, String> {
    let urls = replicas.urls();
    if urls.is_empty() {
        return Err("no replica resolved".into());
    }
    let mut last = String::new();
    for _ in 0..urls.len() {
        let Some(r) = replicas.pick() else { break };
        let mut c = pb::model_node_client::ModelNodeClient::new(r.channel.clone());
        match tokio::time::timeout(timeout, c.info(pb::InfoRequest {})).await {
            Ok(Ok(info)) => return Ok(info.into_inner()),
            Ok(Err(s)) => {
                last = format!(
                    "{}: Info failed: {} {}",
                    r.url,
                    ensemble_proto::status_name(s.code()),
                    s.message()
                )
            }
            Err(_) => last = format!("{}: no answer to Info within {} ms", r.url, timeout.as_millis()),
        }
    }
    Err(last)
}

/// Probes every member once, in parallel, and records the outcome; returns whether the coordinator
/// is ready afterwards.
pub async fn probe_once(c: &Coordinator, timeout: Duration) -> bool {
    let checks = c.members().enumerate().map(|(i, (name, replicas, outlier))| async move {
        match probe_member(replicas, timeout).await {
            Ok(info) => {
                c.set_info(i, info);
                if outlier.probe_ok() {
                    tracing::info!(node = %name, "node is up again (health probe answered)");
                }
            }
            Err(cause) => {
                if outlier.probe_failed(cause.clone()) {
                    tracing::warn!(node = %name, rpc = "Info", error = %cause, "node is down (health probe failed)");
                }
            }
        }
    });
    futures::future::join_all(checks).await;
    c.ready()
}

/// Probes every `every` until `stop` turns true, calling `on_ready` whenever readiness changes (and
/// once after the first probe).
pub async fn run(
    c: Arc<Coordinator>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    on_ready: impl Fn(bool) -> futures::future::BoxFuture<'static, ()> + Send,
) {
    let timeout = every.min(c.settings().deadline).max(Duration::from_millis(50));
    let mut last = None;
    loop {
        let ready = probe_once(&c, timeout).await;
        if last != Some(ready) {
            if last.is_some() {
                if ready {
                    tracing::info!("ready: enough members are up");
                } else {
                    tracing::warn!(
                        min_healthy_nodes = c.settings().min_healthy_nodes,
                        "not ready: too few members are up"
                    );
                }
            }
            on_ready(ready).await;
            last = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
