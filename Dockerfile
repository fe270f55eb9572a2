# Fusion: one image with both binaries (fusion-server, fusion-client).
# Build: docker build -t fusion-demo:local .   (or: docker compose up --build)

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p fusion-server -p fusion-client \
 && mkdir -p /src/models

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /opt/fusion --shell /usr/sbin/nologin fusion \
 && mkdir -p /opt/fusion /certs /reports /state \
 && chown fusion:fusion /certs /reports /state
COPY --from=builder /src/target/release/fusion-server /src/target/release/fusion-client /usr/local/bin/
COPY --from=builder /src/models /opt/fusion/models
COPY --from=builder /src/data /opt/fusion/data
WORKDIR /opt/fusion
USER fusion
# the certs job writes /certs, the client its cost reports to /reports and its trust
# store to /state (its home, /opt/fusion, is not writable); a named volume mounted on
# any of them starts with this ownership
VOLUME ["/certs", "/reports", "/state"]
EXPOSE 50051
CMD ["fusion-client", "--help"]
