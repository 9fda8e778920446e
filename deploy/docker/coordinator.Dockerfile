# Coordinator. The runtime image around a release binary built beforehand (by cargo on the host, or
# inside a Rust image: see deploy/docker/build.sh, which stages the build context and builds this).
#   bash deploy/docker/build.sh                      # -> ensemble-model-node:dev, ensemble-coordinator:dev
# BASE_IMAGE: debian:bookworm-slim with a registry; ensemble-base:bookworm (deploy/docker/base-image.sh)
# without one.
# Configuration: a TOML file passed with COORDINATOR_CONFIG (see deploy/local.toml), overridden by
# COORDINATOR_NODES, COORDINATOR_LISTEN, COORDINATOR_DEADLINE_MS, COORDINATOR_RETRIES and
# COORDINATOR_DEFAULT_STRATEGY.
#   docker run --rm -p 50050:50050 --read-only -v $PWD/coordinator.toml:/etc/ensemble/coordinator.toml:ro \
#     -e COORDINATOR_CONFIG=/etc/ensemble/coordinator.toml ensemble-coordinator:dev
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY coordinator /usr/local/bin/coordinator
LABEL org.opencontainers.image.title="ensemble coordinator" \
      org.opencontainers.image.description="Runs ensemble strategies (SpecFuse, CharED, Co-LLM, RTD, FSLM) over model nodes; gRPC API ensemble.v1.Ensemble" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
# 50050: gRPC (ensemble.v1.Ensemble, grpc.health.v1, reflection); 8080: HTTP (/metrics, OpenAI-style API).
EXPOSE 50050 8080
STOPSIGNAL SIGTERM
# grpc.health.v1 `ensemble.v1.Ensemble`: SERVING while enough members are up and it is not draining.
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 CMD ["coordinator", "health"]
ENTRYPOINT ["coordinator"]
CMD ["serve"]
