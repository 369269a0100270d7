#!/usr/bin/env bash
# The project's one check: formatting, lints (warnings are errors) and the whole test suite.
# Tests that need ../shared or a network skip with a printed reason when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace "$@"
