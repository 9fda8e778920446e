# Model node, CPU. The runtime image around a release binary built beforehand (by cargo on the host,
# or inside a Rust image: see deploy/docker/build.sh, which stages the build context and builds this).
#   bash deploy/docker/build.sh                      # -> ensemble-model-node:dev, ensemble-coordinator:dev
# BASE_IMAGE: debian:bookworm-slim with a registry; ensemble-base:bookworm (deploy/docker/base-image.sh,
# made with debootstrap from Debian's packages) without one. The binary needs only glibc (bookworm's
# 2.36 or newer) and libgcc.
# The model is never part of the image: mount a HuggingFace model directory read-only at /models.
#   docker run --rm -p 50051:50051 --read-only -v /path/to/model:/models:ro ensemble-model-node:dev
# Configuration: MODEL_NODE_* environment variables (see README.md, "Configuration").
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY model-node /usr/local/bin/model-node
ENV MODEL_NODE_MODEL_DIR=/models \
    MODEL_NODE_LISTEN=0.0.0.0:50051 \
    MODEL_NODE_DEVICE=cpu
LABEL org.opencontainers.image.title="ensemble model-node" \
      org.opencontainers.image.description="Serves one HuggingFace model over gRPC (CPU); mount the model read-only at /models" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric user: no passwd entry needed, and Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
# grpc.health.v1 `ensemble.v1.ModelNode`: SERVING once the model is loaded, NOT_SERVING while draining.
HEALTHCHECK --interval=5s --timeout=4s --start-period=120s --retries=3 CMD ["model-node", "health"]
ENTRYPOINT ["model-node"]
CMD ["serve"]
