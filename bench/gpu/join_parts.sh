# Join a model carried in parts onto the GPU machine and check it (a second model beside env_gguf.sh's). Usage:
#   here:  split -n 24 -d -a 2 MODEL.gguf /tmp/p/m.gguf.part; one part per folder .carryHNN/ (45 MiB: with the
#          13 MiB repo copy a call stays under its 64 MiB), then one call each: `mkdir -p DIR && cp .carryHNN/* DIR/`
#   there: bash bench/gpu/join_parts.sh DIR SHA256   -> DIR/model.gguf, the parts removed; exit 1 if it differs
# (the 1.5B took 24 calls of about 5 s each, made while a study's runs trained: study 11).
set -eu
dir=$1; want=$2
cat "$dir"/*.part* > "$dir/model.gguf.partial"
got=$(sha256sum "$dir/model.gguf.partial" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "parts in $dir do not join to $want (got $got): a part is missing or damaged; carry it again" >&2
  rm -f "$dir/model.gguf.partial"; exit 1
fi
mv "$dir/model.gguf.partial" "$dir/model.gguf" && rm -f "$dir"/*.part*
ls -la "$dir/model.gguf"
