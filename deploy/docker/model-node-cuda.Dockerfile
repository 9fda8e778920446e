# Model node with CUDA kernels. Build context: the repository root.
#   docker build -f deploy/docker/model-node-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=80 \
#     -t REGISTRY/ensemble/model-node-cuda:TAG .
# CUDA_COMPUTE_CAP is the GPU generation the kernels are compiled for (no GPU is needed to build):
# 80 A100, 86 A10/A40/RTX 30xx, 89 L4/L40S, 90 H100/H200. Running needs the NVIDIA container
# toolkit (Kubernetes: the NVIDIA device plugin) and a driver for CUDA 12.4 or newer.
# The model is never part of the image: mount a HuggingFace model directory read-only at /models.

ARG CUDA_VERSION=12.4.1

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG RUST_VERSION=1.95.0
ARG CUDA_COMPUTE_CAP=80
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain ${RUST_VERSION}
# Kernels for CUDA_COMPUTE_CAP; link against the driver stub (the real libcuda comes with the driver).
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=ensemble-target-cuda \
    cargo build --release -p model-node --features cuda --locked \
 && install -D -m 0755 target/release/model-node /out/model-node

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
RUN groupadd --system --gid 10001 ensemble \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ensemble
COPY --from=build /out/model-node /usr/local/bin/model-node
ENV MODEL_NODE_MODEL_DIR=/models \
    MODEL_NODE_LISTEN=0.0.0.0:50051 \
    MODEL_NODE_DEVICE=cuda:0 \
    CUDA_CACHE_PATH=/tmp/cuda-cache
LABEL org.opencontainers.image.title="ensemble model-node (CUDA)" \
      org.opencontainers.image.description="Serves one HuggingFace model over gRPC on an NVIDIA GPU; mount the model read-only at /models" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
# grpc.health.v1 `ensemble.v1.ModelNode`: SERVING once the model is loaded, NOT_SERVING while draining.
HEALTHCHECK --interval=5s --timeout=4s --start-period=300s --retries=3 CMD ["model-node", "health"]
ENTRYPOINT ["model-node"]
CMD ["serve"]
