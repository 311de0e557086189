#!/usr/bin/env bash
# slurm/start.sh: the project's single-host development cluster (Debian slurm-wlm 22.05, munge,
# slurmdbd + MariaDB accounting), used by the tests and CI. Must run as root.
#
# Idempotent: installs the Debian packages when missing, writes the config, starts whatever is not
# running (restarting the SLURM daemons only when the config changed) and waits until every node is
# idle. Fake multi-node: REGSCALE_SLURM_NODES slurmd processes (n1, n2, ...) on this host, each
# advertising REGSCALE_SLURM_GPUS fake GPUs (gres backed by dummy device files) so that
# `--gpus-per-node` is scheduled as on a real cluster. Requeue-friendly timings: requeued and
# dependent jobs start within seconds instead of minutes.
#
# Environment (defaults):
#   REGSCALE_SLURM_BASE=/tmp/regscale-slurm   state, spool, logs, pid files
#   REGSCALE_SLURM_NODES=2                    fake nodes n1..nN
#   REGSCALE_SLURM_CPUS=8                     CPUs advertised per node (may exceed the real cores)
#   REGSCALE_SLURM_GPUS=4                     fake GPUs per node (several test jobs run side by side)
#   REGSCALE_SLURM_WAIT_S=90                  how long to wait for idle nodes
set -euo pipefail

BASE=${REGSCALE_SLURM_BASE:-/tmp/regscale-slurm}
NNODES=${REGSCALE_SLURM_NODES:-2}
CPUS=${REGSCALE_SLURM_CPUS:-8}
GPUS=${REGSCALE_SLURM_GPUS:-4}
WAIT_S=${REGSCALE_SLURM_WAIT_S:-90}
CONF=/etc/slurm/slurm.conf
GRESCONF=/etc/slurm/gres.conf
DBDCONF=/etc/slurm/slurmdbd.conf
T0=$(date +%s)
log() { echo "[slurm/start.sh +$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "slurm/start.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=slurm/lib.sh
. "$here/lib.sh"
# The daemons started below outlive this script: they must not inherit its caller's descriptors
# (`flock LOCK bash slurm/start.sh` would otherwise leave LOCK held for as long as the cluster runs).
for fd in /proc/$$/fd/*; do
  n=${fd##*/}
  case $n in 0|1|2|255) ;; *) eval "exec $n>&-" 2> /dev/null || true ;; esac
done

# ---- 1. packages ------------------------------------------------------------------------------
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  # maintainer scripts must not start daemons (no init system here): deny with policy-rc.d
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq > "/tmp/regscale-slurm-apt.log" 2>&1 || { cat /tmp/regscale-slurm-apt.log >&2; die "apt-get update failed"; }
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >> "/tmp/regscale-slurm-apt.log" 2>&1 \
    || { tail -30 /tmp/regscale-slurm-apt.log >&2; die "apt-get install failed (log: /tmp/regscale-slurm-apt.log)"; }
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "packages installed"
fi

# ---- 2. host names and directories ------------------------------------------------------------
HOST=$(hostname -s)
ensure_host() { getent hosts "$1" > /dev/null 2>&1 || echo "127.0.0.1 $1  # regscale slurm/start.sh" >> /etc/hosts; }
ensure_host "$HOST"
NODES=$(seq -f 'n%g' 1 "$NNODES")
for n in $NODES; do ensure_host "$n"; mkdir -p "$BASE/d-$n"; done
mkdir -p "$BASE/ctld"
MEM_NODE=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 / NNODES ))

# ---- 3. munge ---------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0755 /run/munge
[ -s /etc/munge/munge.key ] || { log "creating munge key"; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 1 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge > /dev/null || die "munged did not come up"
fi

# ---- 4. configuration -------------------------------------------------------------------------
new_conf() {
  cat <<EOF
# written by regscale slurm/start.sh; rewritten when its settings change
ClusterName=regscale-dev
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
GresTypes=gpu
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# scheduling passes every 2 s (default 60 / 30 s): requeued and dependent jobs start quickly;
# kill_invalid_depend cancels a job whose dependency can never be satisfied
SchedulerParameters=sched_interval=2,bf_interval=2,kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=300
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/d-%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/slurmctld.log
SlurmdLogFile=$BASE/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
  local port=17000 n
  for n in $NODES; do
    port=$((port + 1))
    echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM_NODE Gres=gpu:$GPUS State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}
new_dbd() {
  cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/slurmdbd.log
PidFile=$BASE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
}
# install_file PATH MODE < content: writes only when different; prints 1 when it changed
install_file() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if cmp -s "$tmp" "$path"; then rm -f "$tmp"; echo 0; return; fi
  chmod "$mode" "$tmp"; mv "$tmp" "$path"; echo 1
}
mkdir -p /etc/slurm
changed=$(new_conf | install_file "$CONF" 644)
# fake GPUs: count-only gres is reported as 0 by slurmd, so each fake GPU is a device file (a
# character device with /dev/null's numbers; nothing ever opens it)
mkdir -p "$BASE/dev"
gres_lines() {
  local i=0 n k
  echo "AutoDetect=off"
  for n in $NODES; do
    for k in $(seq 1 "$GPUS"); do
      [ -e "$BASE/dev/gpu$i" ] || mknod "$BASE/dev/gpu$i" c 1 3
      echo "NodeName=$n Name=gpu File=$BASE/dev/gpu$i"
      i=$((i + 1))
    done
  done
}
gres_changed=$(gres_lines | install_file "$GRESCONF" 644)
dbd_changed=$(new_dbd | install_file "$DBDCONF" 600)
[ "$gres_changed" = 1 ] && changed=1
[ "$changed" = 1 ] && log "wrote $CONF"

# ---- 5. MariaDB + slurmdbd (accounting: sacct, which submitit polls for job states) -------------
mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql > "$BASE/mariadb-install.log" 2>&1
if ! mysqladmin ping > /dev/null 2>&1; then
  log "starting mariadbd"
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid > "$BASE/mariadb.log" 2>&1 < /dev/null &
  for _ in $(seq 1 150); do mysqladmin ping > /dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin ping > /dev/null 2>&1 || { tail -20 "$BASE/mariadb.log" >&2; die "mariadbd did not come up"; }
fi
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
[ "$dbd_changed" = 1 ] && stop_pidfile "$BASE/slurmdbd.pid" slurmdbd
if ! pid_alive "$BASE/slurmdbd.pid" slurmdbd; then
  log "starting slurmdbd"
  /usr/sbin/slurmdbd
  for _ in $(seq 1 100); do (exec 3<> /dev/tcp/127.0.0.1/6819) 2> /dev/null && break; sleep 0.2; done
fi

# ---- 6. slurmctld + one slurmd per fake node --------------------------------------------------
if [ "$changed" = 1 ]; then
  for f in "$BASE"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
  stop_pidfile "$BASE/slurmctld.pid" slurmctld
fi
if ! pid_alive "$BASE/slurmctld.pid" slurmctld; then
  log "starting slurmctld"
  /usr/sbin/slurmctld -i   # -i: ignore state files it cannot read
  for _ in $(seq 1 100); do scontrol ping 2> /dev/null | grep -q UP && break; sleep 0.2; done
fi
# The fake nodes share this host's /dev/shm: the data loader keys its per-node shared memory on the
# host name, not on SLURM's node name.
for n in $NODES; do
  pid_alive "$BASE/slurmd-$n.pid" slurmd || { log "starting slurmd $n"; /usr/sbin/slurmd -N "$n"; }
done

# ---- 7. wait until every node is idle ---------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
  states=$(sinfo -h -N -o '%N %T' 2> /dev/null || true)
  bad=$(echo "$states" | awk 'NF==2 && $2 !~ /^(idle|mixed|allocated)$/ {print $1}' | sort -u)
  [ -n "$states" ] && [ -z "$bad" ] && break
  for n in $(echo "$states" | awk '$2 ~ /^(down|drain|fail|inval)/ {print $1}'); do
    scontrol update NodeName="$n" State=RESUME 2> /dev/null || true
  done
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "$states" >&2; tail -20 "$BASE/slurmctld.log" >&2 || true
    die "nodes not idle after ${WAIT_S}s"
  fi
  sleep 0.5
done
log "ready: $(echo "$states" | tr '\n' ' ')"
