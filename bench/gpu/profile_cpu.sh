# Profile the Qwen3-1.7B-shaped packages on the offline machine's 16-core CPU (a second, quieter CPU).
#
#   bash bench/gpu/profile_cpu.sh setup                  # install carried wheels, re-draw the packages' weights
#   bash bench/gpu/profile_cpu.sh run TAG VARIANTS [ARGS] # bench/profile_models.py on them, report into $OUT
#
# Carried (gitignored, made here by `bash bench/gpu/profile_cpu.sh pack`):
#   .carryP: whl/ (onnxruntime 1.31.1 and onnxruntime-genai 0.18 for Python 3.12, psutil), graphs/ (each
#            package without model.onnx.data and tokenizer.json), tokenizer.json (shared by all of them)
#   .carryM: matplotlib and its wheels (only when that machine lacks it)
# Files outside the repo copy stay while the machine is warm (30 s after a call): /tmp/pk, the installs.
set -euo pipefail
PKGS=out/bench/packages
case "${1:-}" in
pack)  # here: build the carry folders from out/bench/packages
  rm -rf .carryP/graphs && mkdir -p .carryP/graphs .carryP/whl  # whl/ (downloaded once) stays
  for v in "${@:2}"; do
    mkdir -p ".carryP/graphs/qwen3-1.7b-shape-$v"
    (cd "$PKGS/qwen3-1.7b-shape-$v" && cp $(ls | grep -v -e '^model.onnx.data$' -e '^tokenizer.json$') \
      "$OLDPWD/.carryP/graphs/qwen3-1.7b-shape-$v/")
  done
  cp "$PKGS/qwen3-1.7b-shape-$2/tokenizer.json" .carryP/  # the same file in every package (one HF folder)
  du -sh .carryP ;;
setup)  # into the machine's own Python: the profiler's workers run isolated (python -I), blind to PYTHONPATH
  mkdir -p /tmp/pk
  for g in .carryP/graphs/*; do
    p=/tmp/pk/$(basename "$g"); mkdir -p "$p"; cp "$g"/* "$p"/; cp .carryP/tokenizer.json "$p"/
  done
  ls -d /tmp/pk/* | xargs -P 8 -n 1 python3 bench/gpu/materialize.py
  for d in .carryP .carryM; do [ -d "$d" ] && python3 -m pip install -q --no-index --no-deps --no-compile \
    --upgrade "$d"/whl/*.whl; done
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade . >/dev/null
  python3 -c "import onnxruntime, psutil; print('onnxruntime', onnxruntime.__version__)"
  python3 -c "import matplotlib" || echo "NO MATPLOTLIB: carry .carryM" ;;
run)
  tag=$2 variants=$3; shift 3
  [ -d .carryM ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade .carryM/whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade . >/dev/null
  export EDGE_RECOVER_BENCH_PACKAGES=/tmp/pk EDGE_RECOVER_BENCH_GENAI_PYTHON="$(command -v python3)"
  python3 bench/profile_models.py --models qwen3-1.7b-shape --qwen-variants "$variants" --tag "$tag" "$@"
  mkdir -p "$OUT/$tag" && cp docs/results/profile-qwen3-1.7b-shape-"$tag"/* "$OUT/$tag/" ;;
*) echo "usage: bash bench/gpu/profile_cpu.sh pack VARIANT... | setup | run TAG VARIANTS [ARGS]" >&2; exit 2 ;;
esac
