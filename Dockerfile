# syntax=docker/dockerfile:1
# The one image of mailfleet: `mailfleet operator`, `mailfleet relay`, ... (one binary, the
# subcommand picks the role). The Helm chart runs the operator from it and passes it to the
# operator as the relay image.
#
#   docker build -t mailfleet:dev .
#   docker run --rm mailfleet:dev --help
#
# Build stage: the workspace's release build, locked to Cargo.lock. aws-lc-rs and ring need
# only the C compiler of the rust image; the coordinator protocol's Rust code is checked in,
# so no protoc is needed.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Line tables are kept in the release profile for local profiling; the image does without
# them (symbols stay, so panics still name their functions).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p mailfleet \
    && install -D -m 0755 target/release/mailfleet /out/mailfleet

# Runtime: glibc, libgcc and the CA certificates (`ldd mailfleet` lists only libc, libm and
# libgcc_s), no shell, no package manager, user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mailfleet" \
      org.opencontainers.image.description="Outbound SMTP relay fleet operator and relay: egress addresses, SPF/DKIM/DMARC kept in DNS, metric-gated IP warm-up" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/mailfleet" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/mailfleet /usr/local/bin/mailfleet
USER 65532:65532
# Relays run in their spool volume (the operator sets workingDir); the root filesystem can be
# read-only.
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/mailfleet"]
CMD ["--help"]
