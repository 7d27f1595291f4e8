#!/usr/bin/env bash
# Installs what kafray needs beyond cargo, once (later runs skip what is there):
#  - ONNX Runtime: the libonnxruntime.so inside the PyPI `onnxruntime` wheel, in .venv
#    (kafray loads it at run time; ORT_DYLIB_PATH overrides);
#  - the local Kafka-protocol broker for the demo and tests: Tansu (crates.io `nisshi`),
#    built with cargo into ~/.cargo/bin (about 20 minutes on 2 cores, the first time only);
#  - kcat, for the test that any Kafka client can use kafray's formats.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
ORT_VERSION=1.32.0
CONFLUENT_KAFKA_VERSION=2.16.1
NISSHI_VERSION=0.8.1

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import onnxruntime, confluent_kafka, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION')" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION" "confluent-kafka==$CONFLUENT_KAFKA_VERSION"
fi

# Debian's kcat links librdkafka 2.0.2, which cannot parse Tansu's ApiVersion reply; the
# confluent-kafka wheel carries a current librdkafka that kcat can use instead.
rdkafka_lib=$(ls .venv/lib/python3*/site-packages/confluent_kafka.libs/librdkafka-*.so.1 | head -n 1)
mkdir -p .venv/kcat-lib
ln -sf "$(realpath "$rdkafka_lib")" .venv/kcat-lib/librdkafka.so.1

if ! command -v nisshi >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/nisshi" ]; then
  echo "setup: building the local broker (Tansu, crates.io nisshi $NISSHI_VERSION); about 20 minutes on 2 cores, once" >&2
  # Plain --locked fails: a dependency of the default features wants a newer rustc.
  cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
    --no-default-features --features dynostore,libsql
fi

if ! command -v kcat >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat >/dev/null
  else
    echo "setup: kcat is missing and cannot be installed without root; the kcat test will fail (apt-get install kcat)" >&2
  fi
fi
echo "setup: ok (onnxruntime $ORT_VERSION in .venv, broker $(command -v nisshi || echo "$HOME/.cargo/bin/nisshi"), kcat $(command -v kcat || echo missing))"
