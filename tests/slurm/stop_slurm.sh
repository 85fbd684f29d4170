#!/usr/bin/env bash
# Stop the single-node test cluster that start_slurm.sh started: cancel its jobs,
# then stop slurmd, slurmctld and munged (by their pid files, never by name).
# Safe to run when nothing is running.  Leaves packages and config in place.
set -u
RUNDIR=/run/slurm-test
export PATH="$PATH:/usr/sbin:/sbin"

stop_pidfile() {
    local f=$1 name=$2 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null
            echo "stop_slurm.sh: $name ($pid) needed SIGKILL" >&2
        fi
    fi
    rm -f "$f"
}

# only touch a cluster this script family configured
if grep -q "^ClusterName=stabilab" /etc/slurm/slurm.conf 2>/dev/null \
        && command -v squeue >/dev/null 2>&1; then
    jobs=$(squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        sleep 1
    fi
fi
stop_pidfile "$RUNDIR/slurmd.pid" slurmd
stop_pidfile "$RUNDIR/slurmctld.pid" slurmctld
stop_pidfile /run/munge/munged.pid munged
echo "slurm stopped"
