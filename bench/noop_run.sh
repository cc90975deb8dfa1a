#!/usr/bin/env bash
# Wall time of a no-op `qpipe run` (everything cached), as whole processes: median,
# min and max of N runs, after one cold run. Not a test; prints a table.
#
#   bench/noop_run.sh [N]            (default N=21; QPIPE_BENCH_MB=400 sets the large sizes)
#
# Scenarios (all with the real stage kinds, freeze + export_graphdef):
#   push_student   the fixture checkpoint (2.2 MB)
#   big_ckpt       a copy of it whose data shard is padded with QPIPE_BENCH_MB of random
#                  bytes after the last tensor (the reader ignores them, the cache key
#                  hashes them): measures hashing on a cold run and the stat cache on a
#                  no-op run
#   big_graph      a generated frozen GraphDef holding one QPIPE_BENCH_MB float Const:
#                  a large artifact blob and a large exported .pb to check on every no-op
#
# Inputs are aged 3 s before the cold run, and outputs 3 s after it: the stat cache
# refuses to trust stamps younger than 2 s (racy-git rule), so a file written less
# than 2 s ago is rehashed on every run (`noop_racy_ms` shows that case: the first
# no-op right after the cold run). The first aged no-op hashes the outputs once more
# to remember them, which is what `noop_max` shows for the large scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-21}
MB=${QPIPE_BENCH_MB:-400}

cargo build --release --quiet
QPIPE="$PWD/target/release/qpipe"
WORK="$PWD/target/bench-noop"
rm -rf "$WORK"
mkdir -p "$WORK"
FIX="$PWD/fixtures/push_student"

recipe() { # dir, model line
  cat > "$1/recipe.toml" <<EOF
[pipeline]
name = "$(basename "$1")"

[model]
$2

[stages.freeze]
kind = "freeze"

[stages.pb]
kind = "export_graphdef"
input = "freeze"
path = "frozen.pb"
EOF
}

# push_student
mkdir -p "$WORK/push_student"
recipe "$WORK/push_student" "checkpoint = \"$FIX/best_validation\"
inputs = [\"input_x\"]
outputs = [\"score_student/output_student\"]"

# big_ckpt
mkdir -p "$WORK/big_ckpt/model"
cp "$FIX"/best_validation.{meta,index,data-00000-of-00001} "$WORK/big_ckpt/model/"
head -c $((MB * 1024 * 1024)) /dev/urandom >> "$WORK/big_ckpt/model/best_validation.data-00000-of-00001"
recipe "$WORK/big_ckpt" "checkpoint = \"model/best_validation\"
inputs = [\"input_x\"]
outputs = [\"score_student/output_student\"]"

# big_graph: GraphDef { x = Placeholder(float, [n]); w = Const([n]); out = Mul(x, w) }
mkdir -p "$WORK/big_graph"
python3 - "$WORK/big_graph/model.pb" "$MB" <<'PY'
import os, struct, sys
path, mb = sys.argv[1], int(sys.argv[2])
n = mb * 1024 * 1024 // 4
def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)
def field(num, payload):        # length-delimited
    return varint(num << 3 | 2) + varint(len(payload)) + payload
def vfield(num, v):              # varint
    return varint(num << 3) + varint(v)
shape = field(2, vfield(1, n))   # TensorShapeProto.dim { size: n }
def attr(key, value):            # NodeDef.attr map entry
    return field(5, field(1, key.encode()) + field(2, value))
DT_FLOAT = 1
content = os.urandom(n * 4)
tensor = vfield(1, DT_FLOAT) + field(2, shape) + field(4, content)
x = field(1, b"x") + field(2, b"Placeholder") + attr("dtype", vfield(6, DT_FLOAT)) + attr("shape", field(7, shape))
w = field(1, b"w") + field(2, b"Const") + attr("dtype", vfield(6, DT_FLOAT)) + attr("value", field(8, tensor))
out = field(1, b"out") + field(2, b"Mul") + field(3, b"x") + field(3, b"w") + attr("T", vfield(6, DT_FLOAT))
graph = field(1, x) + field(1, w) + field(1, out) + field(4, vfield(1, 27))
with open(path, "wb") as f:
    f.write(graph)
PY
recipe "$WORK/big_graph" "graph = \"model.pb\"
inputs = [\"x\"]
outputs = [\"out\"]"

sleep 3

now_ns() { date +%s%N; }
printf '%-14s %10s %10s %12s %12s %10s %10s  %s\n' scenario inputs cold_s noop_racy_ms noop_median noop_min noop_max "(ms, N=$N)"
for s in push_student big_ckpt big_graph; do
  d="$WORK/$s"
  size=$(du -sh --apparent-size "$FIX" 2>/dev/null | cut -f1)
  [ "$s" != push_student ] && size=$(du -sh --apparent-size "$d" | cut -f1)
  t0=$(now_ns)
  (cd "$d" && "$QPIPE" run recipe.toml > cold.txt)
  t1=$(now_ns)
  (cd "$d" && "$QPIPE" run recipe.toml > noop.txt)
  t2=$(now_ns)
  sleep 3
  times=()
  for _ in $(seq "$N"); do
    a=$(now_ns)
    (cd "$d" && "$QPIPE" run recipe.toml > noop.txt)
    b=$(now_ns)
    times+=($(( (b - a) / 1000 )))
    grep -q "0 ran, 2 cached" "$d/noop.txt" || { echo "not a no-op run in $s:"; cat "$d/noop.txt"; exit 1; }
  done
  sorted=($(printf '%s\n' "${times[@]}" | sort -n))
  med=${sorted[$((N / 2))]}
  printf '%-14s %10s %10.2f %12.1f %12.1f %10.1f %10.1f\n' "$s" "$size" \
    "$(echo "($t1 - $t0) / 1000000000" | bc -l)" "$(echo "($t2 - $t1) / 1000000" | bc -l)" \
    "$(echo "$med / 1000" | bc -l)" "$(echo "${sorted[0]} / 1000" | bc -l)" "$(echo "${sorted[$((N - 1))]} / 1000" | bc -l)"
done
