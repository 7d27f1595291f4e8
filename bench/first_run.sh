#!/usr/bin/env bash
# A newcomer's first command, timed from `git clone` to the demo's report, as on a new machine:
#   bash bench/first_run.sh [REPO]      # REPO: what to clone (default: this checkout)
# It clones into a fresh folder with ../shared beside it and runs the README's first command with
# a fresh HOME and CARGO_HOME (no crates downloaded, no broker built, no pip cache); the Rust
# toolchain is the one rustup already has. Debian packages already installed stay installed
# (remove them first to count their install). cargo's --timings reports of both builds (the
# broker's and kafray's) are kept for "where the time goes". About 10 minutes on 2 cores.
# Prints the seconds to the end of setup and to the report; writes bench/results/first_run/.
set -euo pipefail
repo=$(realpath "${1:-$(dirname "$0")/..}")
out="$(realpath "$(dirname "$0")")/results/first_run"
shared=$(realpath "$repo/../shared")
toolchain=$(dirname "$(rustup which cargo)")
work=$(mktemp -d /tmp/kafray-first-run.XXXX)
mkdir -p "$work/home" "$out"
ln -s "$shared" "$work/shared"
export HOME="$work/home" CARGO_HOME="$work/home/.cargo" RUSTUP_HOME="${RUSTUP_HOME:-$(rustup show home)}"
export PATH="$CARGO_HOME/bin:$toolchain:/usr/local/bin:/usr/bin:/bin"
start=$(date +%s)
git clone -q "$repo" "$work/main"
cd "$work/main"
# Only to keep the timing reports; the builds are the same.
sed -i 's/  cargo build --release --quiet &/  cargo build --release --quiet --timings \&/' scripts/setup.sh
sed -i "s|  cargo install \"\${profile\[@\]}\" nisshi|  cargo install --timings --target-dir $work/broker-target \"\${profile[@]}\" nisshi|" scripts/setup.sh
bash scripts/setup.sh
setup_s=$(( $(date +%s) - start ))
cargo run --release -- demo | tee "$out/demo.txt"
total_s=$(( $(date +%s) - start ))
cp target/cargo-timings/cargo-timing.html "$out/kafray-timing.html"
cp "$work/broker-target/cargo-timings/cargo-timing.html" "$out/broker-timing.html"
echo "first run: setup (apt, broker and kafray builds) $setup_s s, to the demo's report $total_s s" | tee "$out/summary.txt"
rm -rf "$work"
