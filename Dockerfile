# syntax=docker/dockerfile:1
# The operator image: a glibc binary on a distroless-like base assembled from the Debian packages in
# image/packages (libc6, libgcc-s1, ca-certificates, tzdata, netbase), running as 65532 (nonroot).
#
#   docker build -t ghcr.io/mailroom-dev/mailroom:0.1.0 --build-arg MAILROOM_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#
# `make image` (hack/image.sh) builds the same image without a container engine: the same cargo
# command, the same image/rootfs.sh, the same configuration (`hack/image.sh check` compares them).
# The builder and the base are both Debian 12, so the binary runs against the glibc it was built on.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The build context has no .git; the commit shown by `mailroom version` comes in as an argument.
ARG MAILROOM_GIT_COMMIT=unknown
ENV MAILROOM_GIT_COMMIT=${MAILROOM_GIT_COMMIT}
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --package mailroom --bin mailroom \
 && cp target/release/mailroom /mailroom

FROM debian:bookworm-slim AS base
# Only what image/rootfs.sh reads, so that the base is rebuilt only when one of them changes.
COPY image/rootfs.sh image/packages /image/
COPY image/etc/ /image/etc/
RUN apt-get update \
 && /image/rootfs.sh /debs /rootfs \
 && rm -rf /var/lib/apt/lists/* /debs

FROM scratch
COPY --from=base /rootfs/ /
COPY --from=build /mailroom /mailroom
ARG MAILROOM_GIT_COMMIT=unknown
ARG MAILROOM_VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/mailroom-dev/mailroom" \
      org.opencontainers.image.version="${MAILROOM_VERSION}" \
      org.opencontainers.image.revision="${MAILROOM_GIT_COMMIT}"
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
# Metrics and health (/healthz, /readyz).
EXPOSE 8080 8081
ENTRYPOINT ["/mailroom"]
CMD ["run"]
