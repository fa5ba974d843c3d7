# Production image for msgbuf.
#   docker build -t msgbuf .
#   docker run -e MSGBUF_JWT_SECRET=... \
#     -e MSGBUF_MONGODB_URI='mongodb://m1:27017,m2:27017,m3:27017/?replicaSet=rs0' \
#     -p 8080:8080 msgbuf
# The image carries no mongod: point MSGBUF_MONGODB_URI at a replica set
# (see docker-compose.yml for a complete stack).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --locked: build exactly the dependency versions in Cargo.lock.
RUN cargo build --release --locked --bin msgbuf \
 && install -m 0755 target/release/msgbuf /usr/local/bin/msgbuf

FROM debian:bookworm-slim
# ca-certificates: TLS connections to MongoDB (e.g. Atlas) need a trust store.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group \
      --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin msgbuf
COPY --from=build /usr/local/bin/msgbuf /usr/local/bin/msgbuf
USER msgbuf
ENV MSGBUF_BIND=0.0.0.0:8080
EXPOSE 8080
# The slim image has no curl: the binary probes its own /healthz
# (default URL http://127.0.0.1:8080/healthz; exits 0 on HTTP 200).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["msgbuf", "healthcheck"]
ENTRYPOINT ["msgbuf"]
CMD ["serve"]
