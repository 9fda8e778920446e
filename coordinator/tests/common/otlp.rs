//! A real OTLP/gRPC trace receiver on 127.0.0.1:0 that keeps every span it is sent, with the
//! `service.name` of its resource (the trace test and the export benchmark).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;

/// What the receiver got: (service.name, span), and the encoded bytes of the export requests.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<(String, Span)>>>, Arc<AtomicU64>);

impl Received {
    /// Every span so far.
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// The protobuf bytes of every export request so far (what went over the wire, before HTTP/2).
    pub fn bytes(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        self.1
            .fetch_add(prost::Message::encoded_len(&req) as u64, Ordering::Relaxed);
        let mut got = self.0.lock().map_err(|_| tonic::Status::internal("poisoned"))?;
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a receiver; returns its endpoint (`http://127.0.0.1:PORT`) and what it receives.
pub async fn start() -> anyhow::Result<(String, Received)> {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok((endpoint, received))
}

/// An attribute value.
pub enum Attr {
    Int(i64),
    Str(String),
    Other,
}

impl Attr {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Attr::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The attribute `key` of `kvs`.
pub fn attr(kvs: &[KeyValue], key: &str) -> Option<Attr> {
    let v = kvs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match &v.value {
        Some(any_value::Value::IntValue(i)) => Attr::Int(*i),
        Some(any_value::Value::StringValue(s)) => Attr::Str(s.clone()),
        _ => Attr::Other,
    })
}
