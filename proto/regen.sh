#!/usr/bin/env bash
# Regenerates src/formats/tf/proto/generated.rs from proto/tf/*.proto.
# Needs only cargo: protox compiles the .proto files in pure Rust (no protoc).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="$root/src/formats/tf/proto/generated.rs"
mkdir -p "$(dirname "$out")"
cargo run --quiet --release --manifest-path "$here/regen/Cargo.toml" -- "$here/tf" "$out"
rustfmt --edition 2021 "$out"
echo "wrote $out"
