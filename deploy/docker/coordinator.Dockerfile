# Coordinator. Build context: the repository root.
#   docker build -f deploy/docker/coordinator.Dockerfile -t REGISTRY/ensemble/coordinator:TAG .
# Configuration: a TOML file passed with COORDINATOR_CONFIG (see deploy/local.toml), overridden by
# COORDINATOR_NODES, COORDINATOR_LISTEN, COORDINATOR_DEADLINE_MS, COORDINATOR_RETRIES and
# COORDINATOR_DEFAULT_STRATEGY.
#   docker run --rm -p 50050:50050 -v $PWD/coordinator.toml:/etc/ensemble/coordinator.toml:ro \
#     -e COORDINATOR_CONFIG=/etc/ensemble/coordinator.toml REGISTRY/ensemble/coordinator:TAG

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=ensemble-target-cpu \
    cargo build --release -p coordinator --locked \
 && install -D -m 0755 target/release/coordinator /out/coordinator

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 ensemble \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ensemble
COPY --from=build /out/coordinator /usr/local/bin/coordinator
LABEL org.opencontainers.image.title="ensemble coordinator" \
      org.opencontainers.image.description="Runs ensemble strategies (SpecFuse, CharED) over model nodes; gRPC API ensemble.v1.Ensemble" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
# 50050: gRPC (ensemble.v1.Ensemble, grpc.health.v1, reflection); 8080: HTTP (/metrics, OpenAI-style API).
EXPOSE 50050 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["coordinator"]
CMD ["serve"]
