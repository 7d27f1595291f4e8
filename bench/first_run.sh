#!/usr/bin/env bash
# A newcomer's first command, timed from `git clone` to the demo's report, as on a new machine:
#   bash bench/first_run.sh [REPO]      # REPO: what to clone (default: this checkout)
# It clones into a fresh folder with ../shared beside it and runs the README's first command with
# a fresh HOME and CARGO_HOME (no crates downloaded, no broker built, no pip cache); the Rust
# toolchain is the one rustup already has. Debian packages already installed stay installed
# (remove them first to count their install). cargo's --timings reports of both builds (the
# broker's and kafray's) are kept as CSV for "where the time goes". About 10 minutes on 2 cores.
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
# cargo's --timings reports as CSV, one row per compiled unit, longest first.
for build in "kafray:target" "broker:$work/broker-target"; do
  python3 - "${build#*:}/cargo-timings/cargo-timing.html" "$out/${build%%:*}-timings.csv" <<'PY'
import csv, json, re, sys
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);", open(sys.argv[1]).read(), re.S).group(1))
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["unit", "version", "target", "start_s", "duration_s"])
    for u in sorted(units, key=lambda u: -u["duration"]):
        w.writerow([u["name"], u["version"], u.get("target", "").strip(), round(u["start"], 1), round(u["duration"], 1)])
PY
done
echo "first run: setup (apt, broker and kafray builds) $setup_s s, to the demo's report $total_s s" | tee "$out/summary.txt"
rm -rf "$work"
