# The recovery-modes study on one GPU (source bench/gpu/env.sh first). Usage:
#   bash bench/gpu/recovery_modes.sh start "TAG:VARIANT OPTIONS" ...   # runs side by side, detached
#   bash bench/gpu/recovery_modes.sh wait SECONDS                      # poll until all are done or time is up
#   bash bench/gpu/recovery_modes.sh collect [TAG|none]                # results + a qat checkpoint -> $OUT
#                                                        (TAG's, or the best one's; none: the results alone),
#                                                        and each teacher-sample file of 16 MiB or less -> $OUT/data
#   bash bench/gpu/recovery_modes.sh profile [PROFILE OPTIONS]         # `edge-recover profile` of every package
#                                                        the runs exported, on this machine's CPU -> $OUT/profile
# e.g. start "q-w5e-5:qat --lr 5e-5" "lora:lora" "w4:w4" (options go to bench/recovery_modes.py).
# The first run samples the teacher dataset (10k x 256) and the others wait for its file. Everything lives
# in /tmp/rm (outlives the repo copy while the machine stays warm); poll at least every 30 s between calls.
set -u
R=/tmp/rm; W=$R/work; mkdir -p $W $R/res
case "$1" in
start)
  shift; sampled=" "
  THREADS=$(( $(nproc) / $# )); [ $THREADS -lt 1 ] && THREADS=1
  for spec in "$@"; do
    tag=${spec%%:*}; rest=${spec#*:}; variant=${rest%% *}; opts=${rest#"$variant"}
    # the first run of each teacher dataset (its --model, --samples and --seq-len) samples it, later ones wait for its file
    key="$(echo "$opts" | grep -o -e '--samples [0-9]*' -e '--seq-len [0-9]*' -e '--model [^ ]*' -e '--chat-share [0-9.]*' | tr -d ' -' | tr '\n/' __)"
    wait_env=""
    if [ "$variant" != w4 ]; then
      case "$sampled" in *" $key "*) wait_env="BENCH_WAIT_FOR_DATASET=1" ;; *) sampled="$sampled$key " ;; esac
    fi
    echo "$tag" >> $R/tags
    # CPU stages (GPTQ, export, ONNX Runtime scoring) of several runs share the cores: a share each, or they
    # oversubscribe the machine (16 threads x 5 runs stalled GPTQ and the scoring for 25 min in one study)
    env $wait_env OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS setsid nohup python3 "${SRC:-.}"/bench/recovery_modes.py $variant --tag "$tag" --work $W $opts \
      --out $R/res/$tag.json --save $R/save-$tag > $R/res/$tag.log 2>&1 < /dev/null &
  done
  echo "started: $*" ;;
wait)
  end=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt $end ]; do
    left=0
    for tag in $(cat $R/tags); do  # a run is over when its JSON is there or its log shows it failed
      [ -f $R/res/$tag.json ] || grep -q -e Traceback -e '^error:' $R/res/$tag.log || left=$((left + 1))
    done
    [ $left = 0 ] && break
    sleep 20
    echo "$(date +%T) waiting for $left run(s); $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for tag in $(cat $R/tags); do
      [ -f $R/res/$tag.json ] && continue
      grep -q -e Traceback -e '^error:' $R/res/$tag.log && { echo "  $tag FAILED:"; tail -5 $R/res/$tag.log; continue; }
      m=$(ls $W/work-$tag/metrics.jsonl 2>/dev/null) && [ -s "$m" ] && echo "  $tag: $(tail -1 $m)"
    done
  done ;;
collect)
  KEEP=${2:-} python3 - <<'EOF'
import json, os, shutil
from pathlib import Path
R = Path("/tmp/rm"); out = Path(os.environ["OUT"])
res = {}
for tag in (R / "tags").read_text().split():
    f = R / "res" / f"{tag}.json"
    if not f.exists():  # ONNX Runtime still scoring (or the run stopped there): its torch figures
        f = R / "res" / f"{tag}.torch.json"
    log = (R / "res" / f"{tag}.log").read_text(errors="replace")[-3000:] if (R / "res" / f"{tag}.log").exists() else ""
    m = R / "work" / f"work-{tag}" / "metrics.jsonl"
    res[tag] = {"result": json.loads(f.read_text()) if f.exists() else None, "log_tail": log,
                "metrics": m.read_text() if m.exists() else ""}
ok = {t: r["result"] for t, r in res.items() if r["result"] and "recovery_pct" in r["result"]}
qat = {t: r for t, r in ok.items() if r["variant"] == "qat"}
best = max(qat, key=lambda t: qat[t]["recovery_pct"]) if qat else None
lora = next((t for t, r in ok.items() if r["variant"] == "lora"), None)
keep = os.environ.get("KEEP")
bring = [("best", best), ("lora", lora)] if not keep else [] if keep == "none" else [(keep, keep)]
extra = {f.stem: json.loads(f.read_text()) for f in sorted((R / "extra").glob("*.json"))}  # side jobs' summaries
(out / "results.json").write_text(json.dumps({"best": best, "lora": lora, "runs": res, "extra": extra}, indent=2))
for name, tag in bring:  # at most 8 files come back, 16 MiB each
    if tag and (R / f"save-{tag}").is_dir() and len(list((R / f"save-{tag}").iterdir())) <= 7:  # a trained
        # float embedding (--train-head) makes the slim checkpoint too many parts for one call: it stays there
        d = out / name; d.mkdir()
        for f in sorted((R / f"save-{tag}").iterdir()):
            shutil.copy(f, d / f.name)
for f in sorted((R / "work").glob("dataset*.safetensors")):  # teacher samples a later lease can carry back in
    if f.stat().st_size <= 16 << 20:                             # (one file each; larger ones stay there)
        (out / "data").mkdir(exist_ok=True); shutil.copy(f, out / "data" / f.name)
print("best:", best, {t: round(r["recovery_pct"], 2) for t, r in ok.items()})
EOF
  ;;
profile)  # the profiler's workers run isolated (python -I): edge-recover goes into the machine's own Python
  shift
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade "${SRC:-.}" >/dev/null
  pkgs=$(ls -d $W/pkg-* | sort)
  (cd /tmp && env -u PYTHONPATH python3 -m edge_recover profile $pkgs -o $R/profile "$@")
  mkdir -p "$OUT/profile" && cp $R/profile/* "$OUT/profile/" ;;
esac
