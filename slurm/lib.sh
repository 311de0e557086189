# Helpers shared by slurm/start.sh and slurm/stop.sh: daemons are found by pid file only, and a
# pid is trusted only when the process it names has the expected command name.

# pid_alive PIDFILE COMM: true when PIDFILE names a live process whose comm is COMM
pid_alive() {
  local f=$1 name=$2 p
  [ -s "$f" ] || return 1
  p=$(cat "$f" 2> /dev/null) || return 1
  [ -n "$p" ] && kill -0 "$p" 2> /dev/null && [ "$(cat /proc/"$p"/comm 2> /dev/null)" = "$name" ]
}

# stop_pidfile PIDFILE COMM: SIGTERM that process, wait up to 20 s, then SIGKILL
stop_pidfile() {
  local f=$1 name=$2 p
  pid_alive "$f" "$name" || return 0
  p=$(cat "$f")
  kill -TERM "$p" 2> /dev/null || true
  for _ in $(seq 1 100); do kill -0 "$p" 2> /dev/null || return 0; sleep 0.2; done
  echo "$name (pid $p) still alive after 20 s: SIGKILL" >&2
  kill -KILL "$p" 2> /dev/null || true
}
