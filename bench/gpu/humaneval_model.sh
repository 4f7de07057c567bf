# HumanEval pass@1 of one model's fp, W4 and unrecovered W4/W2-GateUp students on the GPU (GPTQ, the cpu
# target's layout), detached beside a study (source bench/gpu/env_gguf.sh first). Usage:
#   setsid nohup bash bench/gpu/humaneval_model.sh MODEL NAME > /tmp/rm/extra/he-NAME.log 2>&1 &
# writes /tmp/rm/extra/he-NAME-w4.json (fp and W4 rows) and he-NAME-w4w2gateup.json (W4/W2-GateUp alone, fp
# left out: the first report has it), which `recovery_modes.sh collect` brings back. 164 problems at batch 32.
# It starts once every run of /tmp/rm/tags has finished training (TAG.torch.json, or its log shows it failed):
# beside two training runs an 80 GB card has no room for a second model (study 11).
set -u
R=/tmp/rm; mkdir -p $R/extra
model=$1; name=$2
for tag in $(cat $R/tags 2>/dev/null); do
  until [ -f $R/res/$tag.torch.json ] || grep -q -e Traceback -e '^error:' $R/res/$tag.log; do sleep 15; done
done
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
