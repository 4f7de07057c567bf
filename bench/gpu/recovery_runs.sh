# Recovery runs on one GPU, side by side (source bench/gpu/env.sh first). Usage:
#   bash bench/gpu/recovery_runs.sh EPOCHS TAG:OPTIONS [TAG:OPTIONS ...]
# e.g. bash bench/gpu/recovery_runs.sh 3 "act256-lr3:" "zero128:--init zero --rank 128 --lr 1e-3"
# (options add to the benchmark's defaults: activation init, rank 256, all layers, lr 3e-4). Mind the GPU
# memory: four runs side by side did not fit one H100 (80 GB); poll at least every 30 s or the machine goes.
# Every run trains against the carried slim checkpoint (/tmp/carry/quantized) on one shared teacher
# dataset (the first run samples it, the others wait for the file). Runs start detached (setsid) and
# write /tmp/res/TAG.{json,log} and the adapter in parts under /tmp/res/TAG/.
set -u
epochs=$1; shift
W=/tmp/w; mkdir -p $W /tmp/res
common="--model $SMOLLM2_GGUF --quantized /tmp/carry/quantized --work $W --no-w4 --gen-batch-size 2048 --epochs $epochs"
first=1
for spec in "$@"; do
  tag=${spec%%:*}; opts=${spec#*:}
  setsid nohup python3 bench/recovery_smollm2.py $common --tag "$tag" $opts --out /tmp/res/$tag.json \
    --save-adapter /tmp/res/$tag > /tmp/res/$tag.log 2>&1 < /dev/null &
  if [ $first = 1 ]; then
    first=0
    while [ ! -f $W/dataset-10000-256-s0.safetensors ]; do sleep 5; done
  fi
done
echo "started: $*"
