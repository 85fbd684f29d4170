#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on localhost, for tests and for trying
# the workflow's SLURM profile on one machine.  Run as root.  Idempotent: if the
# node is already idle it only says so; otherwise it (re)writes the config and
# (re)starts munged, slurmctld and slurmd directly (no systemd needed).
#
# What it sets up (Debian's slurm-wlm 22.05 packages):
#   - munge with a key in /etc/munge/munge.key (created if missing)
#   - /etc/slurm/slurm.conf: cluster "stabilab", controller and one node both
#     named localhost on 127.0.0.1, partition "debug" (default), no accounting,
#     select/cons_tres, proctrack/linuxproc, task/none
#   - /etc/slurm/gres.conf: placeholder GPUs (SLURM_TEST_GPUS, default 2), the
#     first backed by /dev/null, so that jobs asking for --gpus=N / --gres=gpu:N
#     can be scheduled (they run on the CPU).  slurmd drops a GPU without a File= ("Removing file-less GPU"), and
#     the node then goes INVAL "gres/gpu count reported lower than configured".
#   - all daemons bind to 127.0.0.1 only (CommunicationParameters=
#     NoCtldInAddrAny,NoInAddrAny)
#
# Exits 0 once `sinfo` shows the node idle; otherwise exits non-zero with a
# one-line reason on stderr (last line).  Stop everything with stop_slurm.sh.
#
# Environment knobs:
#   SLURM_TEST_WAIT   seconds to wait for the node to become idle (default 60)
#   SLURM_TEST_GPUS   number of placeholder GPUs on the node (default 2: the test's data-parallel
#                     run of 2 processes asks for 2 on one node)
set -u

ETC=/etc/slurm
STATE=/var/lib/slurm-test
LOGDIR=/var/log/slurm-test
RUNDIR=/run/slurm-test
WAIT=${SLURM_TEST_WAIT:-60}
NGPUS=${SLURM_TEST_GPUS:-2}

die() {
    echo "start_slurm.sh: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts daemons)"
export PATH="$PATH:/usr/sbin:/sbin"

# --- 0. one start at a time; already up? ---------------------------------------
# Two test sessions on one machine may call this at once: serialise, and never
# restart a cluster that works (that would kill the other session's jobs).
mkdir -p "$RUNDIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$RUNDIR/start.lock"
    flock -w 900 9 || die "timed out waiting for another start_slurm.sh"
fi
node_state() {
    sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n1
}
node_gpus() {
    scontrol show node localhost 2>/dev/null | sed -n 's/.*Gres=gpu:\([0-9]*\).*/\1/p' | head -n1
}
cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    grep -q "^ClusterName=stabilab" "$ETC/slurm.conf" 2>/dev/null || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    # fewer placeholder GPUs than asked for (an older start): reconfigure
    [ "$(node_gpus)" -ge "$NGPUS" ] 2>/dev/null || return 1
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
    esac
    return 1
}
if cluster_up; then
    echo "slurm already up: node localhost $(node_state)"
    exit 0
fi

# --- 1. packages ----------------------------------------------------------------
need=()
for pkg in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found, cannot install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    aptlog=$(mktemp /tmp/start_slurm_apt.XXXXXX.log)
    # (the packages' maintainer scripts try to start the services; without an
    # init system that only warns, and the daemons are started below anyway)
    apt-get update -qq >"$aptlog" 2>&1 \
        || die "apt-get update failed (no package registry reachable?), see $aptlog"
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${need[@]}" >>"$aptlog" 2>&1 \
        || die "apt-get install ${need[*]} failed, see $aptlog"
    rm -f "$aptlog"
fi
for bin in munged slurmctld slurmd sinfo sbatch srun squeue scontrol; do
    command -v "$bin" >/dev/null 2>&1 \
        || die "$bin not found after installing packages"
done

# --- 2. stop whatever an earlier run of this script left ------------------------
stop_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$f"
}
stop_pidfile "$RUNDIR/slurmd.pid"
stop_pidfile "$RUNDIR/slurmctld.pid"

# --- 3. munge --------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1 || [ -x /usr/sbin/mungekey ]; then
        mungekey --create --keyfile=/etc/munge/munge.key --force >/dev/null 2>&1 \
            || die "mungekey could not create /etc/munge/munge.key"
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none \
            || die "could not create /etc/munge/munge.key"
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # a stale socket/pid from a killed munged makes it refuse to start
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- munged --force >/dev/null 2>&1 9>&- \
        || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 \
        || die "munged is running but munge -n | unmunge fails"
fi

# --- 4. config -------------------------------------------------------------------
mkdir -p "$ETC" "$STATE/ctld" "$STATE/d" "$LOGDIR" "$RUNDIR"
# CPU layout and memory as slurmd itself sees them; keep a little memory back.
hw=$(slurmd -C 2>/dev/null | head -n1)
[ -n "$hw" ] || die "slurmd -C printed nothing (cannot read this machine's hardware)"
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
boards=$(sed -n 's/.* Boards=\([0-9]*\).*/\1/p' <<<"$hw")
sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[ -n "$cpus" ] && [ -n "$mem" ] || die "could not parse slurmd -C output: $hw"
mem=$(( mem * 95 / 100 ))

cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/start_slurm.sh: a single-node test cluster on localhost.
ClusterName=stabilab
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
# bind to 127.0.0.1 (what localhost resolves to), not to every address
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SrunPortRange=60001-60100
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
# keep finished jobs visible to squeue for 5 min: snakemake's SLURM executor
# polls job states with squeue when there is no accounting (sacct) database
MinJobAge=300
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$mem Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
# slurmd ignores GPUs without a File=, and wants one file per GPU: /dev/null for
# the first, empty placeholder files for any more.
files=/dev/null
for i in $(seq 1 $(( NGPUS - 1 ))); do
    : >"$STATE/fake-gpu$i"
    files="$files,$STATE/fake-gpu$i"
done
cat >"$ETC/gres.conf" <<EOF
# Placeholder GPU(s) on this CPU-only test node: lets --gpus=N / --gres=gpu:N
# jobs be scheduled.  Nothing real is behind the device file.
AutoDetect=off
NodeName=localhost Name=gpu File=$files
EOF
# Debian's slurmd/slurmctld don't need cgroup.conf with proctrack/linuxproc and
# task/none; leave any existing one alone.

# --- 5. daemons ------------------------------------------------------------------
# (each started with 9>&-: a daemon must not inherit the start lock)
: >"$LOGDIR/slurmctld.log"
: >"$LOGDIR/slurmd.log"
# -c: start clean (no job state from an earlier run); -i: ignore state file errors
slurmctld -c -i >/dev/null 2>&1 9>&- \
    || die "slurmctld failed to start: $(tail -n1 "$LOGDIR/slurmctld.log" 2>/dev/null)"
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
scontrol ping 2>/dev/null | grep -q "is UP" \
    || die "slurmctld not answering: $(tail -n1 "$LOGDIR/slurmctld.log" 2>/dev/null)"
slurmd -N localhost >/dev/null 2>&1 9>&- \
    || die "slurmd failed to start: $(tail -n1 "$LOGDIR/slurmd.log" 2>/dev/null)"

state=""
for _ in $(seq $(( WAIT * 2 ))); do
    state=$(node_state)
    [ "$state" = "idle" ] && break
    case "$state" in
        inval*) break ;;
        down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.5
done
if [ "$state" != "idle" ]; then
    reason=$(sinfo -h -N -n localhost -o '%E' 2>/dev/null | head -n1)
    die "node localhost not idle after ${WAIT}s (state '${state:-none}', reason '${reason}'): $(tail -n1 "$LOGDIR/slurmd.log" 2>/dev/null)"
fi
echo "slurm up: node localhost idle ($cpus CPUs, ${mem} MB, $NGPUS placeholder GPUs), partition debug"
