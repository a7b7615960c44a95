# edgestream container image, and the balancer image of compose.yaml (docs/DEPLOYMENT.md,
# "Containers"). Build: docker build -t edgestream .   (podman build works the same)

# Build stage: the release binary.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# No .git in the build context: the commit for --version comes from the build argument.
ARG GIT_COMMIT=unknown
ENV BUILD_INFO_GIT_COMMIT_OVERRIDE=$GIT_COMMIT
RUN cargo build --release --locked --bin edgestream

# The node: a slim runtime, an unprivileged user, no development mode (it refuses to start
# without a JWT key). Configure it with EDGESTREAM_* variables or a TOML file.
FROM docker.io/library/debian:bookworm-slim AS node
COPY --from=build /src/target/release/edgestream /usr/local/bin/edgestream
USER 10001:10001
ENV EDGESTREAM_HTTP_LISTEN=0.0.0.0:8080 \
    EDGESTREAM_QUIC_LISTEN=0.0.0.0:4433 \
    EDGESTREAM_LOG_FORMAT=json
EXPOSE 8080/tcp 4433/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/edgestream", "serve"]

# The balancer of compose.yaml: Debian's nginx with deploy/nginx.conf, unchanged.
FROM docker.io/library/debian:bookworm-slim AS balancer
RUN apt-get update && apt-get install -y --no-install-recommends nginx libnginx-mod-stream \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/nginx.conf /etc/nginx/nginx.conf
CMD ["nginx", "-g", "daemon off;"]
