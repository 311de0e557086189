#!/usr/bin/env bash
# slurm/stop.sh: stop what slurm/start.sh started, by pid file only. Jobs are cancelled first so
# that no job process outlives the cluster. --purge also deletes the state directory (job ids then
# restart at 1). Safe to run when nothing is running.
set -uo pipefail
BASE=${REGSCALE_SLURM_BASE:-/tmp/regscale-slurm}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/lib.sh
. "$here/lib.sh"
log() { echo "[slurm/stop.sh] $*"; }

if pid_alive "$BASE/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2> /dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2> /dev/null || true
    for _ in $(seq 1 60); do [ -z "$(squeue -h -o %A 2> /dev/null)" ] && break; sleep 0.5; done
  fi
fi
for f in "$BASE"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
stop_pidfile "$BASE/slurmctld.pid" slurmctld
stop_pidfile "$BASE/slurmdbd.pid" slurmdbd
stop_pidfile /run/mysqld/mysqld.pid mariadbd
stop_pidfile /run/munge/munged.pid munged
if [ "${1:-}" = "--purge" ]; then log "removing $BASE"; rm -rf "$BASE"; fi
log "stopped"
