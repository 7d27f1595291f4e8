#!/usr/bin/env bash
# Installs what kafray needs beyond cargo, once (later runs skip what is there). Without options,
# what the demo needs (README's first command):
#  - from Debian: OpenSSL's and libcurl's headers (libssl-dev, libcurl4-openssl-dev) and
#    pkg-config, which librdkafka is built against (TLS, SASL/SCRAM, OIDC tokens); libjpeg-turbo's
#    TurboJPEG library (libturbojpeg0-dev), which decodes camera frames at the scale the model
#    needs;
#  - ONNX Runtime: the libonnxruntime.so inside the PyPI `onnxruntime` wheel, in .venv
#    (kafray loads it at run time; ORT_DYLIB_PATH overrides);
#  - the local Kafka-protocol broker for the demo and tests: Tansu (crates.io `nisshi`), built
#    with cargo into ~/.cargo/bin once, at -O1 (half the time of -O3, and as fast for the demo),
#    while kafray itself builds beside it.
# With --python (the test command passes it) also what the tests need:
#  - from Debian: openssl (the tests make a CA for a secured broker), kcat (any Kafka client can
#    use kafray's formats) and prometheus (a real Prometheus server scrapes a worker);
#  - Ray, PySpark, matplotlib, maturin and pytest in .venv (about 1 GB, once), confluent-kafka,
#    numpy and Pillow for the Python peer of the benchmarks (bench/peer.py);
#  - the `kafray` Python package: the PyO3 extension built with maturin and installed into .venv
#    (rebuilt incrementally on every run, so it always matches the checkout).
# With --gpu also (for --device cuda; not needed by the tests):
#  - the `onnxruntime-gpu` wheel's libonnxruntime.so with its CUDA execution provider, in
#    .venv/ort-gpu; point ORT_DYLIB_PATH at it. It needs the NVIDIA driver, CUDA 12 and cuDNN 9.
set -euo pipefail
cd "$(dirname "$0")/.."

with_python=0
with_gpu=0
for arg in "$@"; do
  case "$arg" in
    --python) with_python=1 ;;
    --gpu) with_gpu=1 ;;
    *) echo "setup: unknown option $arg (--python: Ray, Spark and the kafray Python package; --gpu: ONNX Runtime with CUDA)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
ORT_VERSION=1.32.0
# The newest onnxruntime-gpu on PyPI; kafray needs >= 1.31 (its C API version 31).
ORT_GPU_VERSION=1.31.1
CONFLUENT_KAFKA_VERSION=2.16.1
NISSHI_VERSION=0.8.1
RAY_VERSION=2.60.0
PYSPARK_VERSION=4.3.0
MATPLOTLIB_VERSION=3.11.2
MATURIN_VERSION=1.16.0
PYTEST_VERSION=9.2.0
NUMPY_VERSION=2.4.6
PILLOW_VERSION=13.0.0
# Grafana's dashboard model (generated from its schemas; Apache-2.0): builds and checks deploy/grafana.
GRAFANA_SDK_VERSION='1769699998!10.1.0'

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import onnxruntime, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION')" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION"
fi

apt_install() {
  local missing=()
  for pkg in "$@"; do
    command -v "$pkg" >/dev/null 2>&1 && continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=sudo
    else
      echo "setup: ${missing[*]} missing and cannot be installed without root; their tests will fail (apt-get install ${missing[*]})" >&2
      return 0
    fi
  fi
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
apt_install libssl-dev libcurl4-openssl-dev pkg-config libturbojpeg0-dev
if [ "$with_python" = 1 ]; then
  apt_install openssl kcat prometheus
fi

if ! command -v nisshi >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/nisshi" ]; then
  echo "setup: building the local broker (Tansu, crates.io nisshi $NISSHI_VERSION) and kafray; about 10 minutes on 2 cores, once" >&2
  # kafray builds beside the broker: two builds keep both cores busy where one alone leaves a core
  # idle (a crate or a build script that compiles by itself), and the demo then starts at once.
  cargo build --release --quiet &
  kafray_build=$!
  # Memory storage (the demo, most tests) and SQLite (the tests of a broker that restarts), at
  # -O1: as fast as -O3 for the demo (docs/reference.md, "The local broker") in half the build
  # time; crates no demo or test request goes through (schemas, the generator, codecs' C code,
  # OpenTelemetry's protobuf) at -O0. KAFRAY_BROKER_OPT_LEVEL=3 builds it all at -O3 instead;
  # KAFRAY_BROKER_OPT_LEVEL=0 all at -O0 but the request path (a shorter build, a slower broker).
  # Plain --locked fails: a dependency of the default features wants a newer rustc.
  profile=(--config profile.release.debug=0)
  case "${KAFRAY_BROKER_OPT_LEVEL:-1}" in
    3) profile=() ;;
    0)
      profile+=(--config profile.release.opt-level=0)
      for hot in nisshi-broker nisshi-service nisshi-sans-io nisshi-storage nisshi-storage-dynostore \
          nisshi-model object_store bytes tokio rama-core rama-net crc-fast; do
        profile+=(--config "profile.release.package.$hot.opt-level=1")
      done
      ;;
    *)
      profile+=(--config profile.release.opt-level=1)
      for cold in jsonschema rhai nisshi-generator nisshi-perf protobuf zstd-sys lz4-sys; do
        profile+=(--config "profile.release.package.$cold.opt-level=0")
      done
      ;;
  esac
  cargo install "${profile[@]}" nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
    --no-default-features --features dynostore,libsql
  wait "$kafray_build" || { echo "setup: building kafray failed (above)" >&2; exit 1; }
fi

if [ "$with_python" = 1 ]; then
  if ! .venv/bin/python -c "import confluent_kafka" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check "confluent-kafka==$CONFLUENT_KAFKA_VERSION"
  fi
  # Debian's kcat links librdkafka 2.0.2, which cannot parse Tansu's ApiVersion reply; the
  # confluent-kafka wheel carries a current librdkafka that kcat can use instead.
  rdkafka_lib=$(ls .venv/lib/python3*/site-packages/confluent_kafka.libs/librdkafka-*.so.1 | head -n 1)
  mkdir -p .venv/kcat-lib
  ln -sf "$(realpath "$rdkafka_lib")" .venv/kcat-lib/librdkafka.so.1
  want="ray==$RAY_VERSION pyspark==$PYSPARK_VERSION matplotlib==$MATPLOTLIB_VERSION maturin==$MATURIN_VERSION pytest==$PYTEST_VERSION numpy==$NUMPY_VERSION pillow==$PILLOW_VERSION grafana-foundation-sdk==$GRAFANA_SDK_VERSION"
  if ! .venv/bin/python - $want <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
PY
  then
    .venv/bin/pip install -q --disable-pip-version-check "ray[default]==$RAY_VERSION" "pyspark==$PYSPARK_VERSION" \
      "matplotlib==$MATPLOTLIB_VERSION" "maturin==$MATURIN_VERSION" "pytest==$PYTEST_VERSION" \
      "numpy==$NUMPY_VERSION" "pillow==$PILLOW_VERSION" "grafana-foundation-sdk==$GRAFANA_SDK_VERSION"
  fi
  command -v java >/dev/null 2>&1 || echo "setup: java is missing; Spark needs Java 17 or later (apt-get install openjdk-17-jre-headless)" >&2
  # `develop` installs the freshly built extension into .venv, next to the Python sources.
  VIRTUAL_ENV="$PWD/.venv" .venv/bin/maturin develop --release -q -m crates/kafray-py/Cargo.toml
fi

if [ "$with_gpu" = 1 ]; then
  if ! ls .venv/ort-gpu/onnxruntime/capi/libonnxruntime.so* >/dev/null 2>&1; then
    .venv/bin/pip install -q --disable-pip-version-check --target .venv/ort-gpu "onnxruntime-gpu==$ORT_GPU_VERSION"
  fi
  echo "setup: for --device cuda: export ORT_DYLIB_PATH=$(ls "$PWD"/.venv/ort-gpu/onnxruntime/capi/libonnxruntime.so* | tail -1)"
fi

echo "setup: ok (onnxruntime $ORT_VERSION in .venv, broker $(command -v nisshi || echo "$HOME/.cargo/bin/nisshi"), kcat $(command -v kcat || echo missing), prometheus $(command -v prometheus || echo missing))"
