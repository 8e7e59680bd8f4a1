#!/usr/bin/env bash
# Stop the test cluster that scripts/slurm/start.sh [DIR] started: scripts/slurm/stop.sh [DIR]
#
# Ends only what this cluster owns: the daemons whose PIDs start.sh wrote to DIR/pids/
# (each checked by name, so a reused PID is left alone), and the slurmstepd and job
# processes of this cluster (descendants of its slurmd, or processes whose environment
# holds a SLURM job id and SLURM_CONF=DIR/slurm.conf).  TERM, wait, then KILL; a zombie
# counts as gone.  Idempotent: with nothing running it does nothing and exits 0.
set -uo pipefail

DIR=${1:-/tmp/fsb-slurm}
case "$DIR" in /*) ;; *) DIR=$(pwd)/$DIR ;; esac
CONF=$DIR/slurm.conf
DAEMONS="slurmd slurmctld slurmdbd munged mariadb"   # reverse start order

state_of() { awk '{print $3}' "/proc/$1/stat" 2>/dev/null; }
running() { local s; s=$(state_of "$1"); [ -n "$s" ] && [ "$s" != Z ]; }

# PID from DIR/pids/$1.pid if that process is still the daemon of that name.
daemon_pid() {
  local pid comm want=$1
  [ "$want" = mariadb ] && want=mariadbd
  pid=$(cat "$DIR/pids/$1.pid" 2>/dev/null) || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$want" ] && running "$pid" && echo "$pid"
}

descendants() {  # every process below PID $1
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

cluster_jobs() {  # slurmstepd and job processes that carry this cluster's SLURM_CONF
  local env_file pid vars
  for env_file in /proc/[0-9]*/environ; do
    pid=${env_file#/proc/}; pid=${pid%/environ}
    [ "$pid" = $$ ] && continue
    vars=$(tr '\0' '\n' 2>/dev/null <"$env_file") || continue   # gone, or not ours to read
    grep -qxF "SLURM_CONF=$CONF" <<<"$vars" || continue
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || grep -q '^SLURM_JOB_ID=' <<<"$vars"; then
      echo "$pid"
    fi
  done
}

# Send TERM to PIDs, wait up to $1 seconds for all to go, then KILL the rest.
end_pids() {
  local limit=$1; shift
  local pid left end=$((SECONDS + limit))
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  while :; do
    left=()
    for pid in "$@"; do running "$pid" && left+=("$pid"); done
    [ ${#left[@]} -eq 0 ] && return 0
    [ "$SECONDS" -ge "$end" ] && break
    sleep 0.2
  done
  kill -KILL "${left[@]}" 2>/dev/null
  sleep 0.5
}

# Jobs first (collected while slurmd still runs, so its children are still below it).
procs=()
if slurmd_pid=$(daemon_pid slurmd); then procs+=($(descendants "$slurmd_pid")); fi
procs+=($(cluster_jobs))
if [ ${#procs[@]} -gt 0 ]; then
  mapfile -t procs < <(printf '%s\n' "${procs[@]}" | sort -un)
  echo "slurm: ending ${#procs[@]} job process(es) of $DIR" >&2
  end_pids 3 "${procs[@]}"
fi

stopped=0
for d in $DAEMONS; do
  if pid=$(daemon_pid "$d"); then
    end_pids 15 "$pid"
    stopped=$((stopped + 1))
  fi
  rm -f "$DIR/pids/$d.pid"
done
[ "$stopped" -gt 0 ] && echo "slurm: stopped $stopped daemon(s) of $DIR" >&2
exit 0
