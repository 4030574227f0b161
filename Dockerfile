# The app image for users with a builder and a registry:
#   docker build -t leaderz:0.1.0 .
# The same layout as the image the project writes itself, without a daemon, for its local
# one-node cluster (crates/leaderz-cluster/src/image.rs; a test keeps the two in step):
# static `leaderz` and `leaderz-example` in /usr/local/bin, user nonroot (65532), /tmp,
# no shell, nothing written at run time (readOnlyRootFilesystem works).

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# Static binaries from the gnu target (no musl needed): they run on an empty base.
RUN RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
        --target x86_64-unknown-linux-gnu \
        -p leaderz-cli --bin leaderz -p leaderz-examples --bin leaderz-example \
    && mkdir -p /rootfs/usr/local/bin /rootfs/etc /rootfs/tmp /rootfs/home/nonroot \
    && cp target/x86_64-unknown-linux-gnu/release/leaderz \
          target/x86_64-unknown-linux-gnu/release/leaderz-example /rootfs/usr/local/bin/ \
    && printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > /rootfs/etc/passwd \
    && printf 'root:x:0:\nnonroot:x:65532:\n' > /rootfs/etc/group \
    && chmod 1777 /rootfs/tmp \
    && chmod 700 /rootfs/home/nonroot && chown 65532:65532 /rootfs/home/nonroot

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/leaderz"]
