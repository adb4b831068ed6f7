#!/usr/bin/env bash
# tools/demo.sh — the README's first command: a real PyTorch training run saving its embeddings.
#
# Installs the Debian packages that are missing (tools/install-deps.sh; needs root), builds the
# Python module and the CLI into build/, then runs tools/demo/run.py: 2 training processes
# (torch.distributed, gloo, CPU) train a small CNN on the handwritten digits of python3-sklearn
# and save the penultimate-layer embedding of every training and held-out sample, every epoch,
# into one store, while a reader process follows the store and prints each epoch's k-NN
# accuracy from the stored embeddings. Ends with a PNG of the embeddings per epoch, the store's
# info, the write throughput and the cost of saving on a training step.
#
# With --serve, `embstore serve` follows the store during the run: the URL of its live page
# (figures, a PCA projection per epoch coloured by digit, key search) is printed at the start and
# the page stays up after the run until Ctrl-C.
#
# Usage: tools/demo.sh [--epochs N] [--serve [--port P]]   (outputs under build/demo/)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
start=$(date +%s)

"$root/tools/install-deps.sh"

# A fresh build/ is configured as Release; an existing one keeps its build type (switching it
# would rebuild everything that tools/test.sh or a developer built there).
build_type=()
[[ -f build/CMakeCache.txt ]] || build_type=(-DCMAKE_BUILD_TYPE=Release)
echo "demo: building into build/ (${build_type[*]:-existing configuration}; Python module and CLI)"
cmake -S . -B build "${build_type[@]}" -DPython_EXECUTABLE=/usr/bin/python3 >/dev/null
cmake --build build -j2 --target _embstore embstore_cli
echo "demo: built in $(( $(date +%s) - start )) s"

/usr/bin/python3 tools/demo/run.py --build build "$@"
echo "demo: total $(( $(date +%s) - start )) s"
