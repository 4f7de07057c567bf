# Set up the GPU machine for a study on a GGUF model carried in parts (source it: `. bench/gpu/env_gguf.sh`).
#
# That machine has no network and a call carries at most 64 MiB with the repo copy, so the model travels in
# parts, one call each, and waits in /tmp/carry (which outlives the repo copy while the machine stays warm):
#   here:  split -n 9 -d MODEL.gguf .carryG/model.gguf.part    # one part per call: carry [".carryG"], keep 1
#          .carryW/whl/ (the wheels env.sh names, for Python 3.12), .carryW/texts/ (Hamlet, Macbeth),
#          .carryW/code.py (the held-out source text), .carryW/model.sha256 (`sha256sum MODEL.gguf` of the whole)
#   there: every call sources this file; the call that brings .carryW joins the parts, checks the sha256 and
#          installs the wheels and edge-recover into /tmp/site.
# Then GGUF=/tmp/carry/model.gguf and BENCH_CODE_TEXT=/tmp/carry/code.py are what bench/recovery_modes.py reads.
mkdir -p /tmp/carry
for d in .carryG .carryW; do [ -d "$d" ] && cp -r "$d"/. /tmp/carry/; done
export PYTHONPATH=/tmp/site EDGE_RECOVER_CACHE=/tmp/carry/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export GGUF=/tmp/carry/model.gguf BENCH_CODE_TEXT=/tmp/carry/code.py SRC=$PWD
if [ -f /tmp/carry/model.sha256 ] && [ ! -f "$GGUF" ]; then
  cat /tmp/carry/model.gguf.part* > "$GGUF.partial"
  want=$(cut -d' ' -f1 /tmp/carry/model.sha256); got=$(sha256sum "$GGUF.partial" | cut -d' ' -f1)
  if [ "$want" = "$got" ]; then mv "$GGUF.partial" "$GGUF" && rm -f /tmp/carry/model.gguf.part*
  else echo "model parts do not join to the carried sha256 ($got != $want): a part is missing or damaged" >&2; fi
  mkdir -p /tmp/carry/cache/shakespeare && cp /tmp/carry/texts/*.txt /tmp/carry/cache/shakespeare/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/carry/whl/*.whl
  rm -rf /tmp/src && cp -r "$PWD" /tmp/src  # the runs read their scripts from here: it outlives the repo copy
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site /tmp/src >/dev/null
fi
[ -d /tmp/src ] && export SRC=/tmp/src
ls -la /tmp/carry | head -20
