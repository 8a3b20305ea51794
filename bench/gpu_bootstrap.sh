#!/usr/bin/env bash
# On the offline GPU machine, from anywhere in the repository: installs the kit that `make gpu-kit` built (.gpu-kit/:
# the parts and manifest.json) into the environment of $PYTHON (default python3), then runs
# `bench/gpu_check.py "$@"`.  That environment must already hold torch, transformers, peft, accelerate and pyarrow;
# pip adds the rest from the kit alone (--no-index), so a missing piece stops it with its name.  bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
KIT=${GPU_KIT:-.gpu-kit}

"$PYTHON" bench/gpu_kit.py unpack --kit "$KIT"  # joins the parts, checks every sha256, extracts $KIT/wheelhouse
"$PYTHON" -m pip install --no-index --find-links "$KIT/wheelhouse" forgetting-ray
echo "gpu_bootstrap: kit unpacked and installed in ${SECONDS} s"
exec "$PYTHON" bench/gpu_check.py "$@"
