# A small static image with the `leaderz` binary and the example app.
#   docker build -t leaderz:0.1.0 .
# No container engine runs on the development machines of this project; the same
# binaries are tested as local processes (see README).

FROM rust:1.89-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
        -p leaderz-cli -p leaderz-examples \
    && mkdir /out \
    && cp target/x86_64-unknown-linux-musl/release/leaderz \
          target/x86_64-unknown-linux-musl/release/leaderz-example /out/

# distroless/static: no shell, no libc needed (the binaries are static), CA
# certificates included, runs as the nonroot user (65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/leaderz /out/leaderz-example /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/leaderz"]
