# bench/peers.py (SmolLM2 against llama.cpp and onnxruntime-genai's builder) on the offline machine's 16-core CPU.
#
#   bash bench/gpu/peers_cpu.sh pack                  # here: llama.cpp and the builder's extras into .carryC
#   . bench/gpu/env.sh && bash bench/gpu/peers_cpu.sh run TAG [peers.py args]   # there, once env.sh has installed
#
# That machine has no network and no llama-cpp-python. What `pack` adds to .carryC (beside env.sh's own carries,
# .carryA / .carryC / .carryB, and profile_cpu.sh's .carryP for onnxruntime and onnxruntime-genai):
#   llama/      llama-cpp-python 0.3.36 built here (a wheel of ctypes bindings and shared libraries, any CPython 3;
#               -DGGML_NATIVE=OFF with AVX2/FMA/F16C: the native build crashed on that Intel CPU, FACTS.md)
#   llama.cpp/  llama.cpp's convert_hf_to_gguf.py and gguf-py from the same sdist (the F32 GGUF every GGUF is made from)
#   whl/        onnx-ir, onnxscript, ml_dtypes (the builder), sentencepiece, diskcache (llama_cpp's import)
set -euo pipefail
LLWHL=${LLWHL:-/tmp/llwhl}          # where `pip wheel llama-cpp-python==0.3.36` wrote its wheel
LLSRC=${LLSRC:-/tmp/llsrc/llama_cpp_python-0.3.36.tar.gz}
case "${1:-}" in
pack)
  rm -rf .carryC/llama .carryC/llama.cpp && mkdir -p .carryC/llama .carryC/llama.cpp .carryC/whl
  python3 -m zipfile -e "$(ls "$LLWHL"/llama_cpp_python-*.whl | head -1)" .carryC/llama/
  tmp=$(mktemp -d) && tar -xzf "$LLSRC" -C "$tmp" --wildcards '*/vendor/llama.cpp/*.py' '*/vendor/llama.cpp/conversion/*' \
    '*/vendor/llama.cpp/gguf-py/*' && cp -r "$tmp"/*/vendor/llama.cpp/. .carryC/llama.cpp/ && rm -rf "$tmp"
  pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 -d .carryC/whl onnx-ir==1.1.0 onnxscript==0.7.2 ml_dtypes==0.7.0 \
    sentencepiece==0.2.3 diskcache==5.6.3
  du -sh .carryC ;;
run)  # after `. bench/gpu/env.sh` (PYTHONPATH=/tmp/site, the cache, the GGUF) and profile_cpu.sh setup (onnxruntime)
  tag=$2; shift 2
  export PYTHONPATH=/tmp/site:/tmp/carry/llama EDGE_RECOVER_PEERS_WORK=/tmp/peers
  export EDGE_RECOVER_PEERS_LLAMA_PYTHON="$(command -v python3)" EDGE_RECOVER_PEERS_CONVERT_PYTHON="$(command -v python3)"
  export EDGE_RECOVER_PEERS_LLAMA_SRC=/tmp/carry/llama.cpp EDGE_RECOVER_PEERS_SOURCE_GGUF="$SMOLLM2_GGUF"
  # the builder wants that machine's transformers 5, not edge-recover's 4.57 in /tmp/site: its own path
  mkdir -p /tmp/site-genai && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target /tmp/site-genai /tmp/carry/whl/onnx_ir-*.whl /tmp/carry/whl/onnxscript-*.whl /tmp/carry/whl/ml_dtypes-*.whl
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-genai exec %s "$@"\n' "$(command -v python3)" > /tmp/genai-python
  chmod +x /tmp/genai-python && export EDGE_RECOVER_BENCH_GENAI_PYTHON=/tmp/genai-python
  # the profiler's workers run `python -I` (blind to PYTHONPATH): edge-recover and llama_cpp in that Python's own site
  PYTHONPATH= python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade . \
    /tmp/carry/whl/diskcache-*.whl >/dev/null
  cp -r /tmp/carry/llama/llama_cpp "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/
  hf="$EDGE_RECOVER_CACHE/smollm2-135m"
  if [ ! -f "$hf/config.json" ]; then  # what `edge-recover fetch smollm2` makes, from the carried GGUF (no PyPI here)
    python3 -c "import sys; from edge_recover.models import load_model; lm = load_model(sys.argv[1]); \
lm.model.save_pretrained(sys.argv[2]); lm.tokenizer.save_pretrained(sys.argv[2])" "$SMOLLM2_GGUF" "$hf"
  fi
  python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
  /tmp/genai-python -c "import onnxruntime_genai.models.builder, transformers; print('builder with', transformers.__version__)"
  python3 bench/peers.py --tag "$tag" --output "$OUT" "$@" ;;
*) echo "usage: bash bench/gpu/peers_cpu.sh pack | run TAG [peers.py args]" >&2; exit 2 ;;
esac
