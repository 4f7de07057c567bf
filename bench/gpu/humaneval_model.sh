# HumanEval pass@1 of one model's fp, W4 and unrecovered W4/W2-GateUp students on the GPU (GPTQ, the cpu
# target's layout), detached beside a study (source bench/gpu/env_gguf.sh first). Usage:
#   setsid nohup bash bench/gpu/humaneval_model.sh MODEL NAME > /tmp/rm/extra/he-NAME.log 2>&1 &
# writes /tmp/rm/extra/he-NAME-w4.json (fp and W4 rows) and he-NAME-w4w2gateup.json (W4/W2-GateUp alone, fp
# left out: the first report has it), which `recovery_modes.sh collect` brings back. 164 problems at batch 32.
set -u
R=/tmp/rm; mkdir -p $R/extra
model=$1; name=$2
run() {  # SCHEME, then `eval` arguments
  scheme=$1; shift
  echo "$(date +%T) humaneval $name $scheme"
  python3 -m edge_recover.cli eval "$model" --tasks humaneval --scheme "$scheme" --device cuda --batch-size 32 \
    --json $R/extra/he-$name-$scheme.json "$@" > $R/extra/he-$name-$scheme.log 2>&1 \
    || echo "  $scheme FAILED: $(tail -2 $R/extra/he-$name-$scheme.log)"
}
run w4
run w4w2gateup --no-fp
echo "$(date +%T) humaneval $name done"
