# The Leash sidecar. Build from the repository root:
#   docker build -f deploy/docker/leash-proxy.Dockerfile -t leash-proxy .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p leash-proxy --bin leash-proxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home leash
COPY --from=build /src/target/release/leash-proxy /usr/local/bin/leash-proxy
USER 10001
EXPOSE 15001 15000 15021
ENTRYPOINT ["/usr/local/bin/leash-proxy"]
