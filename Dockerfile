# Warren: multi-stage build. The runtime image holds only the binary (SQLite is compiled in)
# and runs as an unprivileged user. Every flag is also an environment variable, WARREN_<FLAG>.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p warren-broker --bin warren \
    && strip target/release/warren

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/warren --create-home warren
COPY --from=build /src/target/release/warren /usr/local/bin/warren
USER warren
WORKDIR /var/lib/warren
ENV WARREN_AMQP_LISTEN=0.0.0.0:5672 \
    WARREN_DATA_DIR=/var/lib/warren/data \
    RUST_LOG=info
VOLUME ["/var/lib/warren/data"]
EXPOSE 5672
ENTRYPOINT ["/usr/local/bin/warren"]
