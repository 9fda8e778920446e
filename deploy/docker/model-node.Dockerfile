# Model node, CPU build. Build context: the repository root.
#   docker build -f deploy/docker/model-node.Dockerfile -t REGISTRY/ensemble/model-node:TAG .
# The model is never part of the image: mount a HuggingFace model directory read-only at /models.
#   docker run --rm -p 50051:50051 -v /path/to/model:/models:ro REGISTRY/ensemble/model-node:TAG
# Configuration: MODEL_NODE_* environment variables (see README.md, "Configuration").

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=ensemble-target-cpu \
    cargo build --release --workspace --locked \
 && install -D -m 0755 target/release/model-node /out/model-node

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 ensemble \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ensemble
COPY --from=build /out/model-node /usr/local/bin/model-node
ENV MODEL_NODE_MODEL_DIR=/models \
    MODEL_NODE_LISTEN=0.0.0.0:50051 \
    MODEL_NODE_DEVICE=cpu
LABEL org.opencontainers.image.title="ensemble model-node" \
      org.opencontainers.image.description="Serves one HuggingFace model over gRPC (CPU); mount the model read-only at /models" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["model-node"]
CMD ["serve"]
