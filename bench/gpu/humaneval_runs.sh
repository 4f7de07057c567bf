# HumanEval pass@1 of a recovery study's torch models on the GPU, beside bench/gpu/recovery_modes.sh's runs
# (source bench/gpu/env_gguf.sh first). Usage, detached like the runs:
#   setsid nohup bash bench/gpu/humaneval_runs.sh MODEL TAG... > /tmp/rm/extra/he.log 2>&1 &
# Once every TAG's training is over (its torch figures written, TAG.torch.json): the fp model and the first TAG's
# unrecovered start (WORK/base-TAG), then each TAG's recovered checkpoint (WORK/out-TAG), fp left out; 164
# problems at batch 32 in one `generate` each (docs/eval.md). Each report goes to /tmp/rm/extra/he-NAME.json,
# which `recovery_modes.sh collect` brings back with the runs' results.
# HE_NO_FP=1 leaves the fp row out of the start's report too (a model whose fp row an earlier lease measured);
# HE_W4=1 adds the model's plain W4 row (the cpu target's layout, GPTQ), fp left out.
# The recovered torch model is the package up to float rounding (docs/recovery.md: its exact graph equals the
# student within 1e-4 of the logit scale), so these rows stand for the packages' own, which only ONNX
# Runtime on a CPU can score (hours for a study, not minutes).
set -u
R=/tmp/rm; W=$R/work; mkdir -p $R/extra
model=$1; shift
he() {  # NAME, then `eval` arguments
  name=$1; shift
  echo "$(date +%T) humaneval $name: $*"
  python3 -m edge_recover.cli eval "$model" --tasks humaneval --device cuda --batch-size 32 \
    --json $R/extra/he-$name.json "$@" > $R/extra/he-$name.log 2>&1 || echo "  $name FAILED: $(tail -2 $R/extra/he-$name.log)"
  echo "$(date +%T) humaneval $name over"
}
first=$1
no_fp=""; [ "${HE_NO_FP:-0}" = 1 ] && no_fp="--no-fp"
# after every run's training (TAG.torch.json; each run then frees its GPU memory for ONNX Runtime's CPU scoring):
# beside two training runs an 80 GB card had no room for the fp model and the start (study 11, out of memory)
for tag in "$@"; do
  until [ -f $R/res/$tag.torch.json ] || grep -q -e Traceback -e '^error:' $R/res/$tag.log; do sleep 15; done
  he $tag --quantized $W/out-$tag --no-fp   # each run's row as soon as its training is over
done
he start-$first --quantized $W/base-$first $no_fp
[ "${HE_W4:-0}" = 1 ] && he w4 --scheme w4 --no-fp
echo "$(date +%T) humaneval done"
