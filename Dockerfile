# syntax=docker/dockerfile:1
# The machinist controller image: a static (musl) binary on an empty base, running as
# the non-root user 65532.
#
#   docker build -t ghcr.io/machinist-dev/machinist:0.1.0 .
#
# TLS is rustls with the ring provider, so there is no OpenSSL to link; ring's C and
# assembly parts are compiled with musl-gcc (musl-tools).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# The whole workspace: cargo needs every member's manifest to resolve it.
COPY . .
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p machinist --target x86_64-unknown-linux-musl \
 && mkdir -p /out/var/lib/machinist/fake \
 && cp target/x86_64-unknown-linux-musl/release/machinist /out/machinist
# Fail the build if the binary is not static.
RUN ! ldd /out/machinist 2>/dev/null | grep -q '=>'

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/machinist /machinist
# The fake driver's default state directory, writable by 65532 (a volume in Kubernetes).
COPY --from=build --chown=65532:65532 /out/var/lib/machinist /var/lib/machinist
LABEL org.opencontainers.image.title="machinist" \
      org.opencontainers.image.description="A Kubernetes controller for Machines (VMs and hosts) through Docker Machine style drivers" \
      org.opencontainers.image.source="https://github.com/machinist-dev/machinist" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/machinist"]
CMD ["run"]
