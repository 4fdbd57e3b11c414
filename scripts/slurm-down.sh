#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by scripts/slurm-up.sh: cancel all jobs, stop slurmd,
# slurmctld and the munged it started. /etc/slurm/slurm.conf and the munge key stay, so slurm-up.sh
# works again at once.
#
#   scripts/slurm-down.sh            # keep $SLURM_STATE_DIR (logs, saved job state, job id counter)
#   scripts/slurm-down.sh --purge    # also delete $SLURM_STATE_DIR (next slurm-up starts from job id 1)
set -uo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/fmcache-slurm}"
PURGE=0
for a in "$@"; do
    case "$a" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "slurm-down: unknown argument $a" >&2; exit 2 ;;
    esac
done
unset SLURM_CONF

log() { echo "slurm-down: $*" >&2; }
pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null; }
# alive PID NAME: exists, not a zombie, and is NAME (a stale pid file may name a reused pid)
alive() {
    local st
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
    st="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null)"
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ] || return 1
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

stop_pid() {  # name pid
    local name="$1" pid="$2"
    alive "$pid" "$name" || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do alive "$pid" "$name" || { log "stopped $name ($pid)"; return 0; }; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
    log "killed $name ($pid)"
}

CTLD_PID="$(pid_of "$STATE/slurmctld.pid")"
if alive "$CTLD_PID" slurmctld; then
    JOBS="$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [ -n "${JOBS// /}" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel --quiet $JOBS 2>/dev/null || true
        # let slurmd kill the job steps before it goes away
        for _ in $(seq 1 50); do
            alive "$(pid_of "$STATE/slurmd.pid")" slurmd || break
            [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
        log "cancelled all jobs"
    fi
fi

stop_pid slurmd "$(pid_of "$STATE/slurmd.pid")"
stop_pid slurmctld "$CTLD_PID"
rm -f "$STATE/slurmd.pid" "$STATE/slurmctld.pid"

# SLURM_ACCOUNTING=1: slurmdbd and the private MariaDB
stop_pid slurmdbd "$(pid_of "$STATE/slurmdbd.pid")"
rm -f "$STATE/slurmdbd.pid"
stop_pid mariadbd "$(pid_of "$STATE/mariadbd.pid")"

# munged: only the one slurm-up started (it runs as user munge with the package's pid file)
MUNGE_PID="$(pid_of "$STATE/munged.pid")"
if [ -n "$MUNGE_PID" ]; then
    stop_pid munged "$MUNGE_PID"
    rm -f "$STATE/munged.pid"
fi

if [ "$PURGE" = 1 ]; then
    rm -rf "$STATE"
    log "removed $STATE"
fi
exit 0
