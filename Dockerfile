# Warren: multi-stage build. The runtime image holds only the binary (SQLite is compiled in)
# and runs as an unprivileged user. Every flag is also an environment variable, WARREN_<FLAG>.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p warren-broker --bin warren -p warren-ctl --bin warrenctl \
    && strip target/release/warren target/release/warrenctl

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/warren --create-home warren
COPY --from=build /src/target/release/warren /usr/local/bin/warren
COPY --from=build /src/target/release/warrenctl /usr/local/bin/warrenctl
USER warren
WORKDIR /var/lib/warren
ENV WARREN_AMQP_LISTEN=0.0.0.0:5672 \
    WARREN_HTTP_LISTEN=0.0.0.0:15672 \
    WARREN_PROMETHEUS_LISTEN=0.0.0.0:15692 \
    WARREN_DATA_DIR=/var/lib/warren/data \
    RUST_LOG=info
VOLUME ["/var/lib/warren/data"]
EXPOSE 5672 15672 15692
# warrenctl ping asks the management API (as guest from loopback unless WARRENCTL_USER and
# WARRENCTL_PASSWORD say otherwise): healthy once the node serves.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/warrenctl", "-q", "ping"]
ENTRYPOINT ["/usr/local/bin/warren"]
