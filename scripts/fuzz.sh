#!/usr/bin/env bash
# Fuzzes the CONNECT reader, the CONNECT rewrite and the connection's first bytes (fuzz/): every target in turn, SECONDS in all
# (default 60, what CI runs). A long run by hand: `bash scripts/fuzz.sh 3600`. Each target starts from its
# corpus (fuzz/corpus/TARGET, kept between runs, not committed) and from seeds written afresh by
# fuzz/seeds from the tests' MQTT codec. A crash stops the script; its input is saved under
# fuzz/artifacts/TARGET/ and cargo-fuzz prints the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
targets=(connect first_packet rewrite)

# cargo-fuzz needs a nightly compiler. Use the nightly toolchain where one is installed; otherwise let the
# stable one accept nightly flags (RUSTC_BOOTSTRAP), as a machine with only the stable toolchain must.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz into ~/.cargo/bin (a minute or two, once)" >&2
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

cargo run --quiet --locked --release --manifest-path fuzz/seeds/Cargo.toml -- fuzz/target/seeds
cargo "${toolchain[@]}" fuzz build
per_target=$(( seconds / ${#targets[@]} ))
(( per_target > 0 )) || per_target=1
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "fuzzing $t for ${per_target} s" >&2
  # -timeout: one input that takes seconds is a hang (every read is ready at once).
  cargo "${toolchain[@]}" fuzz run "$t" "fuzz/corpus/$t" "fuzz/target/seeds/$t" -- \
    -max_total_time="$per_target" -timeout=10 -print_final_stats=1
done
