#!/usr/bin/env bash
# Start a real single-node SLURM cluster on loopback for tests: scripts/slurm/start.sh [DIR]
#
# MariaDB -> munged -> slurmdbd -> (sacctmgr add cluster) -> slurmctld -> slurmd, each in the
# foreground under setsid with its PID in DIR/pids/, then one warm-up batch job.  Accounting
# is not optional: submitit reads job states with sacct.  Idempotent: with the cluster up it
# only prints the export line.  stdout is exactly `export SLURM_CONF=DIR/slurm.conf` (use
# `eval "$(scripts/slurm/start.sh)"`); progress goes to stderr.  A failure ends with one
# line `error: ...` on stderr and exit 1, after stopping whatever this call had started.
# Keep DIR short: the munge socket lives in it (Unix sockets: 108 characters at most).
# Every start is a fresh cluster state (job ids restart at 1, empty accounting).
set -uo pipefail

DIR=${1:-/tmp/fsb-slurm}
DB_PORT=${FSB_SLURM_DB_PORT:-16819}          # MariaDB; slurmctld/slurmd/slurmdbd keep 6817-6819
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
DAEMONS="mariadb munged slurmdbd slurmctld slurmd"   # start order (stop.sh stops in reverse)

log() { echo "slurm: $*" >&2; }
die() {  # one line, then undo this call's partial start
  echo "error: $*" >&2
  [ -d "$DIR/pids" ] && "$HERE/stop.sh" "$DIR" >/dev/null 2>&1
  exit 1
}

# Poll `cmd` until it succeeds, at most $1 seconds.
wait_for() {
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.2
  done
}

alive() {  # PID file $1 names a running (not zombie) process
  local pid state
  pid=$(cat "$1" 2>/dev/null) || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -n 1; }

case "$DIR" in /*) ;; *) DIR=$(pwd)/$DIR ;; esac
[ ${#DIR} -le 80 ] || { echo "error: cluster folder $DIR is ${#DIR} characters; expected at most 80 (the munge socket path must stay under 108): pass a shorter DIR, e.g. /tmp/fsb-slurm" >&2; exit 1; }
export SLURM_CONF=$DIR/slurm.conf

# ----------------------------------------------------------------------------------------
# Already up? Then nothing to do.

node_state() { sinfo -h -N -n localhost -o %T 2>/dev/null | head -n 1; }
cluster_up() {
  local d
  for d in $DAEMONS; do alive "$DIR/pids/$d.pid" || return 1; done
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; esac
  return 1
}
if cluster_up; then
  log "already running in $DIR"
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "error: scripts/slurm/start.sh must run as root (it installs packages and runs the SLURM daemons as root); got uid $(id -u): rerun with sudo" >&2; exit 1; }

# A partial cluster from an earlier call (a daemon died): stop what is left, start afresh.
if [ -d "$DIR/pids" ]; then "$HERE/stop.sh" "$DIR" >&2 || true; fi

# ----------------------------------------------------------------------------------------
# Packages

have_all() {
  local b
  for b in munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sinfo sbatch sacct sacctmgr; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
  done
}
export PATH=$PATH:/usr/sbin:/sbin
if ! have_all; then
  mkdir -p "$DIR"
  log "installing $PACKAGES (log: $DIR/apt.log)"
  command -v apt-get >/dev/null 2>&1 || { echo "error: SLURM is not installed and apt-get is missing; expected a Debian-like system: install $PACKAGES yourself" >&2; exit 1; }
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES; } \
    >"$DIR/apt.log" 2>&1 || { echo "error: apt-get install of $PACKAGES failed: $(last_line "$DIR/apt.log") (full log: $DIR/apt.log)" >&2; exit 1; }
  have_all || { echo "error: after apt-get install, a SLURM/munge/MariaDB program is still missing; see $DIR/apt.log" >&2; exit 1; }
fi

# ----------------------------------------------------------------------------------------
# Configuration (fresh state every start; the munge key and the database files are kept)

mkdir -p "$DIR"/{pids,log,state,spool,munge-etc,munge-run,munge-lib,mysql-run}
rm -rf "$DIR"/state/* "$DIR"/spool/* "$DIR"/pids/*
for d in $DAEMONS; do : >"$DIR/log/$d.log"; : >"$DIR/log/$d.out"; done
chmod 700 "$DIR/munge-etc" "$DIR/munge-lib"
chmod 755 "$DIR" "$DIR/munge-run"
SOCK=$DIR/munge-run/munge.socket.2
KEY=$DIR/munge-etc/munge.key
[ -s "$KEY" ] || mungekey -c -k "$KEY" >/dev/null 2>&1 || die "mungekey could not create $KEY"
chmod 600 "$KEY"

DB_PASS=fsb-slurm-test                           # loopback-only throwaway database
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
CPUS=$(nproc)

cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm/start.sh: a one-node test cluster on loopback.
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK,cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux
MinJobAge=300
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# slurmdbd reads slurmdbd.conf beside \$SLURM_CONF; it holds a password, hence mode 600
( umask 077; cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/state/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)

# Start daemon $1 in the foreground of its own session; its PID goes to DIR/pids/$1.pid.
# setsid execs in place here (a background job is no group leader), so $! is the daemon.
spawn() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
}

daemon_log() { local f=$DIR/log/$1.log; [ -s "$f" ] || f=$DIR/log/$1.out; last_line "$f"; }

# Poll `cmd` until daemon $1 answers through it, at most $2 seconds; fail at once if it exits.
wait_up() {
  local name=$1 limit=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    alive "$DIR/pids/$name.pid" || die "$name exited at start: $(daemon_log "$name") (logs: $DIR/log/)"
    [ "$SECONDS" -ge "$end" ] && die "$name did not answer within $limit s: $(daemon_log "$name") (logs: $DIR/log/)"
    sleep 0.2
  done
}

# ----------------------------------------------------------------------------------------
# MariaDB, munged, slurmdbd, the cluster record, slurmctld, slurmd

T0=$SECONDS
DB_SOCK=$DIR/mysql-run/mysqld.sock
sql() { mariadb --no-defaults -S "$DB_SOCK" -u root -e "$1"; }
if [ ! -d "$DIR/mysql/mysql" ]; then
  log "initialising MariaDB in $DIR/mysql"
  mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --skip-test-db \
    --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
    || { rm -rf "$DIR/mysql"; die "mariadb-install-db failed: $(last_line "$DIR/log/mariadb-install.log")"; }
fi
spawn mariadb mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DB_SOCK" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/mysql-run/mysqld.pid" \
  --log-error="$DIR/log/mariadb.log" --innodb-lock-wait-timeout=900 --innodb-buffer-pool-size=128M
wait_up mariadb 60 sql "SELECT 1"
sql "DROP DATABASE IF EXISTS slurm_acct_db;
     CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
     CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" >"$DIR/log/mariadb-grant.log" 2>&1 \
  || die "could not create the slurm database user: $(last_line "$DIR/log/mariadb-grant.log")"

spawn munged munged -F --force --socket="$SOCK" --key-file="$KEY" --log-file="$DIR/log/munged.log" \
  --pid-file="$DIR/munge-run/munged.pid" --seed-file="$DIR/munge-lib/munged.seed"
wait_up munged 20 munge -S "$SOCK" -n

spawn slurmdbd slurmdbd -D
wait_up slurmdbd 60 sacctmgr -n list cluster
sacctmgr -i add cluster localcluster >"$DIR/log/sacctmgr.log" 2>&1 \
  || sacctmgr -n list cluster format=cluster | grep -qw localcluster \
  || die "sacctmgr add cluster failed: $(last_line "$DIR/log/sacctmgr.log")"

spawn slurmctld slurmctld -D -c -i
wait_up slurmctld 30 scontrol ping
spawn slurmd slurmd -D -N localhost
node_idle() { [ "$(node_state)" = idle ]; }
wait_up slurmd 60 node_idle
log "daemons up in $((SECONDS - T0)) s"

# The first batch job after slurmctld starts waits a few seconds: pay that here, not in a test.
# (Polled here: `sbatch --wait` backs off to 10 s between checks.)
WARMUP=$(sbatch --parsable -J warmup -o /dev/null -e /dev/null --wrap true 2>"$DIR/log/warmup.log") \
  || die "the warm-up batch job was refused: $(last_line "$DIR/log/warmup.log")"
warmup_done() { sacct -n -X -j "$WARMUP" -o State 2>/dev/null | grep -qw COMPLETED; }
wait_for 120 warmup_done || die "the warm-up batch job $WARMUP did not complete within 120 s: $(sacct -n -X -j "$WARMUP" -o State,Reason 2>&1 | head -n 1)"
log "cluster ready in $((SECONDS - T0)) s (warm-up job done); logs in $DIR/log"
echo "export SLURM_CONF=$SLURM_CONF"
