# The Leash control plane, with leashctl. Build from the repository root:
#   docker build -f deploy/docker/leash-control-plane.Dockerfile -t leash-control-plane .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p leash-control-plane --bin leash-control-plane --bin leashctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home leash \
    && mkdir -p /var/lib/leash && chown 10001 /var/lib/leash
COPY --from=build /src/target/release/leash-control-plane /usr/local/bin/leash-control-plane
COPY --from=build /src/target/release/leashctl /usr/local/bin/leashctl
USER 10001
VOLUME /var/lib/leash
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/leash-control-plane"]
CMD ["serve", "--policy", "/etc/leash/policy.yaml", "--data-dir", "/var/lib/leash"]
