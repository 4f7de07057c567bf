#!/usr/bin/env bash
# Create .venv-openvino at the repo root: onnxruntime-openvino (the OpenVINO execution provider) plus
# edge-recover without its heavy dependencies. It needs its own venv because the onnxruntime-openvino wheel
# installs the same `onnxruntime` module as the plain onnxruntime wheel. Idempotent.
#   bash runtimes/openvino_venv.sh && .venv-openvino/bin/python -c "import onnxruntime as o; print(o.get_available_providers())"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${OPENVINO_VENV:-.venv-openvino}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "onnxruntime-openvino==1.24.1" "onnx==1.23.2" "numpy<2.5" "tokenizers==0.22.2" "typer==0.29.2" "jinja2"
# the runtime needs only numpy, onnx, tokenizers from edge-recover's dependencies
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -c "import onnxruntime as o; assert 'OpenVINOExecutionProvider' in o.get_available_providers(), o.get_available_providers(); print('openvino venv ready:', o.__version__)"
