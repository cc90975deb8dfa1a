#!/usr/bin/env bash
# Regenerates src/formats/tflite/schema_generated.rs from proto/tflite/schema.fbs
# with flatc 23.5.26 (built from source by the `flatc` crate; needs cmake and a
# C++ compiler), then formats it so `cargo fmt --check` stays clean.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cargo run --quiet --release \
  --manifest-path "$root/proto/tflite/regen/Cargo.toml" \
  --target-dir "$root/target/tflite-regen-build" -- "$root"
rustfmt --edition 2021 "$root/src/formats/tflite/schema_generated.rs"
