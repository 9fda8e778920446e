//! A `grpc.health.v1` probe, the container health check of both binaries (`model-node health`,
//! `coordinator health`): the images carry no separate probe program, and a TCP connect would call a
//! draining or still-loading server healthy.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The address a probe inside the server's own container dials for a listen address: loopback when
/// the server listens on every interface.
pub fn local_target(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// Asks the plaintext gRPC server at `addr` for the status of `service` ("" for the process as a
/// whole) within `timeout`; `Ok` only when it answers SERVING, else a sentence saying what it answered.
pub async fn check(addr: std::net::SocketAddr, service: &str, timeout: Duration) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("{addr} does not accept connections ({e})"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| format!("{addr} answered {:?}: {}", s.code(), s.message()))?;
        let status = reply.into_inner().status;
        if status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
            Err(format!("{addr} reports {service:?} as {name}"))
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("{addr} gave no answer within {} ms", timeout.as_millis()))?
}

/// The `health` subcommand of both binaries: probes the server listening on `listen` from its own
/// host (a wildcard address on loopback) on a runtime of its own.
pub fn probe_local(listen: std::net::SocketAddr, service: &str, timeout: Duration) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the probe's runtime: {e}"))?;
    rt.block_on(check(local_target(listen), service, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_probed_on_loopback() {
        assert_eq!(
            local_target("0.0.0.0:50051".parse().expect("an address")),
            "127.0.0.1:50051".parse().expect("an address")
        );
        assert_eq!(
            local_target("[::]:9".parse().expect("an address")),
            "[::1]:9".parse().expect("an address")
        );
        assert_eq!(
            local_target("10.0.0.2:7".parse().expect("an address")),
            "10.0.0.2:7".parse().expect("an address")
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_reported_not_hung() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = l.local_addr().expect("bound");
        drop(l);
        let e = check(addr, "", Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert!(e.contains("does not accept connections"), "{e}");
    }
}
