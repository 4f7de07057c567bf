# The distributed path on one GPU (source bench/gpu/env.sh first): the same small qat run started plainly and
# through `accelerate launch --num_processes 1`, one after the other; writes /tmp/rm/extra/distributed.json
# (held-out KL before/after, steps, seconds of each, and the difference). Usage (detached, beside a study):
#   setsid nohup bash bench/gpu/distributed_one_gpu.sh > /tmp/rm/extra/distributed.log 2>&1 &
set -u
R=/tmp/rm/extra; D=$R/dist; mkdir -p $D
OPTS="--samples 2048 --seq-len 256 --gen-batch-size 512 --batch-size 32 --epochs 1 --overwrite"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
python3 -m edge_recover recover "$SMOLLM2_GGUF" -o $D/plain --work-dir $D/plain.work $OPTS > $D/plain.log 2>&1
python3 -m accelerate.commands.launch --num_processes 1 -m edge_recover recover "$SMOLLM2_GGUF" -o $D/launched \
  --work-dir $D/launched.work --dataset $D/plain.work/dataset.safetensors $OPTS > $D/launched.log 2>&1
python3 - <<'PY'
import json
from pathlib import Path
D = Path("/tmp/rm/extra/dist")
out = {}
for name in ("plain", "launched"):
    f = D / name / "recovery_report.json"
    r = json.loads(f.read_text()) if f.is_file() else None
    out[name] = {k: r.get(k) for k in ("kl_before", "kl_after", "step", "seconds", "train_seconds", "processes",
                                       "device", "gpu", "codes_moved")} if r else None
    out[name + "_log_tail"] = (D / f"{name}.log").read_text(errors="replace")[-1500:]
if out["plain"] and out["launched"]:
    out["kl_after_difference"] = out["launched"]["kl_after"] - out["plain"]["kl_after"]
Path("/tmp/rm/extra/distributed.json").write_text(json.dumps(out, indent=2))
PY
