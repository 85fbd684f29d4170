#!/usr/bin/env bash
# One lent GPU: the first runs of "verdicts that survive review", all from one commit.
#   SPAM vs Adam at 4 x the length (configs/spam_long.yaml, 6 runs), the pre-registered early-warning
#   replication (configs/early_warning_replication.yaml, 32 runs), and grokking at matched beta2
#   (configs/grokking_beta2.yaml, 6 runs) beside the official pairing re-made (grokking_full, 12 runs),
#   all at once under one MPS server (no early-warning run starts after 400 s: the rest of its 32
#   runs then train in a later session from this commit). Runs outside the synced tree (a later call re-copies it) and
#   outlive a call (setsid); each call ends by packing every run record so far into $OUT.
# Usage (repo root on the GPU machine; .carry/shards.tar.xz and .whl/ carried):
#   COMMIT=<sha> benchmarks/sessions/spam_long_beta2_ew.sh start SECONDS    # set up, launch, wait, pack
#   benchmarks/sessions/spam_long_beta2_ew.sh wait SECONDS                  # wait, pack
#   EW_DEADLINE=S EW_JOBS=N benchmarks/sessions/spam_long_beta2_ew.sh ew SECONDS  # start the early-
#       warning runs late (no run starts after S seconds), then wait and pack
set -uo pipefail
W=/root/session
R=$W/repo
mode=$1
seconds=${2:-500}
t0=$(date +%s)

if [ "$mode" = start ]; then
  rm -rf "$W" && mkdir -p "$W/mps/pipe" "$W/mps/log" "$W/bench" && cp -a . "$R" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" .whl/*.whl || exit 1
  for name in spam_long early_warning_replication; do
    mkdir -p "$R/results/$name/data" && tar xJf .carry/shards.tar.xz -C "$R/results/$name/data" || exit 1
  done
  gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  ew_jobs=${EW_JOBS:-$(( gib > 120000 ? 12 : 5 ))}  # EW_JOBS=0: no early-warning runs this time
  cat > "$W/env.sh" <<ENV
export PYTHONPATH=$W/site:$R/src PYTHONUNBUFFERED=1 STABILAB_GIT_COMMIT=$COMMIT STABILAB_GIT_DIRTY=0
export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
ENV
  . "$W/env.sh"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, pydantic; print('torch', torch.__version__, 'pydantic', pydantic.__version__)"
  nvidia-cuda-mps-control -d || exit 1
  cd "$R"
  setsid nohup python3 benchmarks/bench_grid.py --config configs/spam_long.yaml --jobs 6 --threads 1 --retries 3 --no-report \
    --out "$W/bench/spam_long" > "$W/spam_long.log" 2>&1 < /dev/null &
  setsid nohup python3 benchmarks/grok_gpu.py --config configs/grokking_full.yaml configs/grokking_beta2.yaml \
    --no-report > "$W/grok.log" 2>&1 < /dev/null &
  [ "$ew_jobs" -gt 0 ] && sleep 60  # SPAM compiles first; the 32 small runs start beside it
  [ "$ew_jobs" -gt 0 ] && setsid nohup python3 benchmarks/bench_grid.py --config configs/early_warning_replication.yaml --jobs "$ew_jobs" \
    --threads 1 --deadline 400 --no-report --out "$W/bench/early_warning_replication" > "$W/ew.log" 2>&1 < /dev/null &
  setsid nohup bash -c "while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
    --format=csv,noheader >> $W/gpu_util.csv; sleep 10; done" > /dev/null 2>&1 < /dev/null &
  disown -a
fi

. "$W/env.sh" 2>/dev/null || { echo "no session on this machine (started fresh?): nothing to wait for"; exit 3; }
cd "$R"
if [ "$mode" = ew ]; then
  setsid nohup python3 benchmarks/bench_grid.py --config configs/early_warning_replication.yaml --jobs "${EW_JOBS:-12}" \
    --threads 1 --deadline "${EW_DEADLINE:-300}" --no-report --out "$W/bench/early_warning_replication" \
    >> "$W/ew.log" 2>&1 < /dev/null &
  disown -a
fi
done_runs() { find results -name summary.json | wc -l; }
while [ $(( $(date +%s) - t0 )) -lt "$seconds" ]; do
  if ! pgrep -f "bench_grid.py|grok_gpu.py" > /dev/null; then echo "all launchers ended"; break; fi
  sleep 30
  echo "$(( $(date +%s) - t0 )) s: $(done_runs) runs finished; $(tail -1 "$W/gpu_util.csv" 2>/dev/null)"
done
for log in spam_long ew grok; do echo "== $log"; tail -4 "$W/$log.log"; done
tail -2 results/spam_long/runs/spikes/*/L8_lr0.001_s*/metrics.jsonl 2>/dev/null | cut -c1-160
# every run record so far (no checkpoints or weights), the grid reports and logs
tar cJf "$OUT/records.tar.xz" --exclude=ckpt.pt --exclude=model.pt --exclude='data' results
tar cJf "$OUT/logs.tar.xz" -C "$W" bench spam_long.log ew.log grok.log gpu_util.csv 2>/dev/null
ls -la "$OUT"
