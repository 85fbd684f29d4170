#!/usr/bin/env bash
# One lent GPU: preset grids (or slices of them) trained by one commit, in a detached chain that
# outlives the call, under one MPS server; each call waits, then packs every run record so far (no
# checkpoints or weights), the grid reports and the logs into $OUT. A grid split over leases is
# finished by the same start command in the next lease: runs with a summary.json of COMMIT are
# skipped, runs of any other commit are moved aside and trained again (bench_grid --commit).
#
# Usage (repo root on the GPU machine; carried: .whl/ (pydantic's wheels) and .carry/<name>.tar.xz,
# the token shards and tokenizer.json of each preset, as `tar cf - shards tokenizer.json | xz` in
# results/<preset>/data):
#   COMMIT=<sha> benchmarks/sessions/grid.sh start SECONDS "PRESET SHARDS JOBS [bench_grid args]" ...
#   benchmarks/sessions/grid.sh wait SECONDS                 # until it prints "nothing running"
# (a big pack comes back split: `cat records.tar.xz.part* > records.tar.xz`)
# Each quoted job is one bench_grid launch, or "cmd:<command>" any other command (run in the tree's
# copy); the jobs run one after another (a later one starts when the one before ends), except that a
# job marked "bg:" runs beside the ones after it; bench_grid's overrides go after "--" (e.g.
# "oec shards 8 --seeds 2 -- key=value"):
#   COMMIT=$(git log -1 --format=%H -- src pyproject.toml) benchmarks/sessions/grid.sh start 540 \
#     "early_warning_replication shards 8" "two_instabilities shards 12 --seeds 2"
# Before the call, here: the tree that travels (tracked and untracked files, the carried paths) must
# stay under 64 MiB, so move results/ and figures/ out of the checkout except results/<preset> of the
# grids being trained (their finished runs must travel, or they train again); move them back after.
# COMMIT is the last commit that changed the code that trains (src/, pyproject.toml), which every
# run records as its provenance: commits of results and docs in between leave it unchanged, so a
# grid split over leases records one commit. Check before each call that the tree's code is that
# commit's: `git diff --quiet $COMMIT -- src pyproject.toml && git diff --quiet -- src pyproject.toml`.
set -uo pipefail
W=${GRID_SESSION_DIR:-/root/grid_session}  # the session's folder, outside the synced tree
R=$W/repo
mode=${1:-}
seconds=${2:-540}
t0=$(date +%s)
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "SECONDS must be a number, got '$seconds'"; exit 2; }
running() { [ -f "$W/chain.pid" ] && kill -0 "$(cat "$W/chain.pid")" 2> /dev/null; }

if [ "$mode" = start ]; then
  [ -n "${COMMIT:-}" ] || { echo "COMMIT is not set (the commit of the training code)"; exit 2; }
  shift 2
  [ $# -gt 0 ] || { echo "no grid given: \"PRESET SHARDS JOBS [bench_grid args]\""; exit 2; }
  for job in "$@"; do  # every job checked before anything is touched
    job=${job#bg:}
    [[ "$job" == cmd:* ]] && continue
    read -r preset shards jobs _ <<< "$job"
    [ -f "configs/$preset.yaml" ] || { echo "no configs/$preset.yaml (job '$job')"; exit 2; }
    [ -f ".carry/$shards.tar.xz" ] || { echo "no .carry/$shards.tar.xz (job '$job')"; exit 2; }
    [[ "$jobs" =~ ^[0-9]+$ ]] || { echo "JOBS must be a number (job '$job')"; exit 2; }
  done
  if [ -d "$W" ]; then
    running && { echo "a session is running here: use 'wait'"; exit 4; }
    mv "$W" "$W.$(date +%s)"  # an earlier, finished session is kept
  fi
  mkdir -p "$W/mps/pipe" "$W/mps/log" "$W/bench" && cp -a . "$R" || exit 1
  if compgen -G ".whl/*.whl" > /dev/null; then  # the wheels the GPU machine lacks (pydantic)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" .whl/*.whl || exit 1
  fi
  cat > "$W/env.sh" <<ENV
export PYTHONPATH=$W/site:$R/src PYTHONUNBUFFERED=1 STABILAB_GIT_COMMIT=$COMMIT STABILAB_GIT_DIRTY=0
export CUDA_MPS_PIPE_DIRECTORY=$W/mps/pipe CUDA_MPS_LOG_DIRECTORY=$W/mps/log
ENV
  . "$W/env.sh"
  echo "set -f  # no globbing: overrides hold [lists]" > "$W/chain.sh"
  i=0
  for job in "$@"; do
    i=$((i + 1))
    amp=""
    if [[ "$job" == bg:* ]]; then job=${job#bg:}; amp=" &"; fi  # beside the jobs after it
    if [[ "$job" == cmd:* ]]; then  # any other command, run in the tree's copy as it stands
      cmd="${job#cmd:}"
      log=$W/$i-cmd.log
    else
      read -r preset shards jobs extra <<< "$job"
      name=$(cd "$R" && python3 -c "from stabilab.experiment import load_experiment as l; print(l('configs/$preset.yaml')['name'])") || exit 1
      mkdir -p "$R/results/$name/data" && tar xJf ".carry/$shards.tar.xz" -C "$R/results/$name/data" || exit 1
      cmd="python3 benchmarks/bench_grid.py --config configs/$preset.yaml --jobs $jobs --threads 1 --retries 3 --commit $COMMIT --no-report --out $W/bench/$i-$preset ${extra:-}"
      log=$W/$i-$preset.log
    fi
    echo "{ ( $cmd ) > $log 2>&1; echo \"job $i exit \$? at \$(date +%T)\"; }$amp" >> "$W/chain.sh"
  done
  echo "wait" >> "$W/chain.sh"
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  cat "$W/chain.sh"
  if ! nvidia-cuda-mps-control -d; then  # without MPS the runs still train, taking turns on the GPU
    echo "no MPS daemon: the runs share the GPU without it"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    sed -i '/CUDA_MPS/d' "$W/env.sh"
  fi
  cd "$R"
  setsid nohup bash "$W/chain.sh" > "$W/chain.log" 2>&1 < /dev/null &
  echo $! > "$W/chain.pid"
  setsid nohup bash -c "while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
    --format=csv,noheader >> $W/gpu_util.csv; sleep 10; done" > /dev/null 2>&1 < /dev/null &
  disown -a
elif [ "$mode" != wait ]; then
  echo "usage: grid.sh start SECONDS \"PRESET SHARDS JOBS [args]\"... | grid.sh wait SECONDS"; exit 2
fi

. "$W/env.sh" 2>/dev/null || { echo "no session on this machine (started fresh?): nothing to wait for"; exit 3; }
cd "$R"
while true; do
  if ! running; then echo "nothing running"; break; fi
  left=$(( seconds - ($(date +%s) - t0) ))
  [ "$left" -gt 0 ] || break
  sleep $(( left < 20 ? left : 20 ))
  echo "$(( $(date +%s) - t0 )) s: $(find results -name summary.json -newer "$W/env.sh" | wc -l) summaries written" \
    "this session; $(tail -1 "$W/gpu_util.csv" 2>/dev/null)"
done
cat "$W/chain.log"
for log in "$W"/[0-9]*.log; do echo "== $log"; tail -3 "$log"; done
# what this session wrote under results/, but no weights or checkpoints (*.pt), files being written
# (*.tmp), shards (*/data/*), runs of other commits set aside (*.by-*) or anything over 8 MB: those
# are listed in left_out.txt instead. The logs first, so that they come back whatever follows.
# (one find: each file it meets goes to exactly one of the two lists)
find results -type f -newer "$W/env.sh" ! -path '*/data/*' ! -path '*.by-*' \( \( -name '*.pt' -o -name '*.pt.*' \
  -o -name '*.tmp' -o -size +8M \) -fprintf "$W/left_out.txt" '%s %p\n' -o -fprint "$W/written" \)
tar cJf "$OUT/logs.tar.xz" -C "$W" bench chain.sh chain.log gpu_util.csv left_out.txt mps/log \
  $(cd "$W" && ls [0-9]*.log 2> /dev/null)
XZ_OPT=-T0 tar cJf "$OUT/records.tar.xz" -T "$W/written"
if [ "$(stat -c %s "$OUT/records.tar.xz")" -ge 16000000 ]; then  # the largest file that comes back: 16 MiB
  split -b 15M -d "$OUT/records.tar.xz" "$OUT/records.tar.xz.part" && rm "$OUT/records.tar.xz"
fi
ls -la "$OUT"
