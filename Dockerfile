# syntax=docker/dockerfile:1
# The operator image: a static musl binary on distroless, running as the unprivileged user 65532.
#
#   docker build -t ghcr.io/mailroom-dev/mailroom:0.1.0 --build-arg MAILROOM_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#
# TLS is rustls on ring (no OpenSSL), so the binary links nothing at run time; ring's C and assembly
# parts are compiled with musl-gcc.

FROM rust:1.95-bookworm AS build
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
# The Rust target for the platform being built (linux/amd64 or linux/arm64), built natively.
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported architecture: ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
# The build context has no .git; the commit shown by `mailroom version` comes in as an argument.
ARG MAILROOM_GIT_COMMIT=unknown
ENV MAILROOM_GIT_COMMIT=${MAILROOM_GIT_COMMIT}
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    target="$(cat /rust-target)" \
 && TARGET_CC=musl-gcc cargo build --release --locked --target "$target" --package mailroom --bin mailroom \
 && cp "target/$target/release/mailroom" /mailroom

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /mailroom /mailroom
USER 65532:65532
# Metrics and health (/healthz, /readyz).
EXPOSE 8080 8081
ENTRYPOINT ["/mailroom"]
CMD ["run"]
