#!/usr/bin/env bash
# The next lent GPU for "OEC: find what the drift needs": (b) the data (configs/oec_unseen.yaml,
# 18 runs of 4000 steps with the never-seen ids masked) and (c) the step count
# (configs/oec_100k.yaml, 4 runs of OEC's 100k steps), all from one commit. Everything runs outside
# the synced tree (a later call re-copies it) and outlives a call (setsid); each call waits, then
# packs every run record so far (no checkpoints or weights) and the measurements into $OUT.
#   start [S]          set up, then one detached chain: the per-step time of oec_100k's model
#                      (baseline) at 8 x 512 and at 16 x 512 alone (bench_throughput, CUDA graphs,
#                      about 1.5 min each), 4 runs of it at once under MPS for 3000 steps (name
#                      oec_100k_probe: each run's tokens/s in its records; at most 5 min), then
#                      oec_unseen's 18 runs, 9 at a time under MPS (about 10 min); wait up to S s
#   long "LRS" JOBS [S]  oec_100k's runs at the LRs LRS ("0.1 0.3" or "0.3"), JOBS at once under
#                      MPS; wait up to S s. First set oec_100k.yaml's batch from the measurements
#                      (and commit it): a run cannot span two leases
#   wait [S]           wait up to S s for what runs, then pack
# Usage (repo root on the GPU machine; .carry/shards.tar.xz, the oec preset's GPT-2 shards of the
# Gutenberg poetry, and .whl/, pydantic's wheels, carried):
#   COMMIT=<sha> benchmarks/sessions/oec_unseen_100k.sh start 540
#   benchmarks/sessions/oec_unseen_100k.sh wait 540          (until "nothing running")
#   COMMIT=<sha> benchmarks/sessions/oec_unseen_100k.sh long "0.1 0.3" 4 540   (a later lease)
# The shards tarball is 33.9 MB: where it does not fit beside the tree in one call (64 MiB in all),
# carry it in pieces (split -b 5M) over calls to one warm machine, each appending its piece to
# /root/oec_shards.tar.xz, then start with SHARDS=/root/oec_shards.tar.xz.
set -uo pipefail
W=/root/oec_session
R=$W/repo
mode=${1:-}
t0=$(date +%s)

setup() {
  [ -f "$W/env.sh" ] && return 0
  rm -rf "$W" && mkdir -p "$W/m" && cp -a . "$R" || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" .whl/*.whl || return 1
  for name in oec_unseen oec_100k oec_100k_probe; do
    mkdir -p "$R/results/$name/data" && tar xJf "${SHARDS:-.carry/shards.tar.xz}" -C "$R/results/$name/data" || return 1
  done
  cat > "$W/env.sh" <<ENV
export PYTHONPATH=$W/site:$R/src PYTHONUNBUFFERED=1 STABILAB_GIT_COMMIT=${COMMIT:-unknown} STABILAB_GIT_DIRTY=0
ENV
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  setsid nohup bash -c "while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
    --format=csv,noheader >> $W/gpu_util.csv; sleep 10; done" > /dev/null 2>&1 < /dev/null &
}

detach() {  # detach SCRIPT: run it in its own session, in the copied repo
  setsid nohup bash "$1" > "$1.log" 2>&1 < /dev/null &
  disown -a
}

pack() {
  cd "$R" || exit 1
  for log in "$W"/*.log; do [ -f "$log" ] && { echo "== $log"; tail -4 "$log"; }; done
  for f in results/oec_100k_probe/runs/lr/*/*/metrics.jsonl; do
    [ -f "$f" ] && echo "$f: step, tokens/s $(tail -1 "$f" | python3 -c \
      'import json,sys; r=json.load(sys.stdin); print(r["step"], round(r["tokens_per_s"]))')"
  done
  tar cJf "$OUT/records.tar.xz" --exclude=ckpt.pt --exclude=model.pt --exclude=data \
    $(ls -d results/oec_unseen results/oec_100k results/oec_100k_probe 2>/dev/null)
  (cd "$W" && tar cJf "$OUT/measure.tar.xz" m $(ls gpu_util.csv ./*.log 2>/dev/null))
  ls -la "$OUT"
}

wait_runs() {  # until nothing of this session runs, or S seconds after the call began
  while [ $(( $(date +%s) - t0 )) -lt "$1" ]; do
    pgrep -f "bench_grid.py|bench_throughput.py|$W/chain" > /dev/null || { echo "nothing running"; break; }
    sleep 30
    echo "$(( $(date +%s) - t0 )) s: $(find results/oec_unseen results/oec_100k results/oec_100k_probe \
      -name summary.json 2>/dev/null | wc -l) runs finished; \
$(tail -1 "$W/gpu_util.csv" 2>/dev/null)"
  done
}

case "$mode" in
  start)
    setup || exit 1
    . "$W/env.sh" && cd "$R" || exit 1
    cat > "$W/chain_start.sh" <<CHAIN
. $W/env.sh; cd $R
for b in 8 16; do
  timeout 240 python3 benchmarks/bench_throughput.py --config configs/oec_100k.yaml --variants baseline \
    --n-layer 6 --n-embd 224 --n-head 4 --block-size 512 --batch-size \$b --micro-batch \$b \
    --warmup 30 --steps 1000 --out $W/m/tp\$b > $W/tp\$b.log 2>&1
done
timeout -s TERM 300 python3 benchmarks/bench_grid.py --config configs/oec_100k.yaml --jobs 4 --mps --threads 2 \
  --no-report --out $W/m/probe name=oec_100k_probe train.steps=3000 > $W/probe.log 2>&1
python3 benchmarks/bench_grid.py --config configs/oec_unseen.yaml --jobs 9 --mps --threads 1 --no-report \
  --out $W/m/oec_unseen > $W/oec_unseen.log 2>&1
CHAIN
    detach "$W/chain_start.sh"
    wait_runs "${2:-540}"
    ;;
  long)
    setup || exit 1
    cp -a configs src benchmarks "$R/" || exit 1  # this call's commit (the batch set from the measurements)
    . "$W/env.sh" && cd "$R" || exit 1
    cat > "$W/chain_long.sh" <<CHAIN
. $W/env.sh; cd $R
python3 benchmarks/bench_grid.py --config configs/oec_100k.yaml --lrs $2 --jobs $3 --mps --threads 2 \
  --no-report --out $W/m/oec_100k > $W/oec_100k.log 2>&1
CHAIN
    detach "$W/chain_long.sh"
    wait_runs "${4:-540}"
    ;;
  wait)
    . "$W/env.sh" 2>/dev/null || { echo "no session on this machine (started fresh?): nothing to wait for"; exit 3; }
    cd "$R" || exit 1
    wait_runs "${2:-540}"
    ;;
  *) echo "usage: $0 start [S] | long \"LRS\" JOBS [S] | wait [S]"; exit 2 ;;
esac
pack
