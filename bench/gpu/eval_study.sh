# Task accuracy of the recovery study's models on the GPU (source bench/gpu/env.sh first; run after
# `recovery_modes.sh wait` reports the runs done). The table's W4 and W4/W2 rows are the study's own
# checkpoints (plain W4 of the w4 run, the GPTQ start the lora run trained on), so every adapter and
# recovered checkpoint is scored against the integers it started from. Usage:
#   bash bench/gpu/eval_study.sh OUT_DIR "LABEL=TAG" ...   # TAG: a qat run (its checkpoint) or lora:TAG (its adapter)
set -u
W=/tmp/rm/work; E=/tmp/rm/eval; mkdir -p $E
out=$1; shift
[ -e $E/w4 ] || ln -s $W/ckpt-w4 $E/w4
[ -e $E/w4w2gateup ] || ln -s $W/base-lora $E/w4w2gateup
args=()
for spec in "$@"; do
  label=${spec%%=*}; tag=${spec#*=}
  case "$tag" in
    lora:*) args+=(--adapter "$label=$W/out-${tag#lora:}") ;;
    *) args+=(--checkpoint "$label=$W/out-$tag") ;;
  esac
done
OMP_NUM_THREADS=4 python3 "${SRC:-.}"/bench/eval_smollm2.py table --work $E --device cuda --out-dir "$out" "${args[@]}"
