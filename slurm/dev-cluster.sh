#!/usr/bin/env bash
# A real single-node Slurm (with accounting) on this machine, for development and CI.
#
#   slurm/dev-cluster.sh start    install (once), configure and start munged, MariaDB,
#                                 slurmdbd, slurmctld, slurmd; idempotent
#   slurm/dev-cluster.sh stop     cancel its jobs, stop exactly the daemons `start` started
#   slurm/dev-cluster.sh status   sinfo + squeue; exit 0 iff the cluster is up
#
# Needs root and Debian 12 (Slurm 22.05 packages). No systemd: daemons are started by
# hand and every pid this script started is recorded under $AVS_SLURM_DIR/started/, so
# `stop` never touches a munged or MariaDB that was already running before `start`.
# Logs: $AVS_SLURM_DIR/log/. Why each setting is there: docs/slurm.md and the comments below.
set -euo pipefail

STATE=${AVS_SLURM_DIR:-/var/lib/avs-dist-slurm}
CLUSTER=${AVS_SLURM_CLUSTER:-avsdev}
PARTITION=${AVS_SLURM_PARTITION:-debug}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
MARKER="# written by avs-dist slurm/dev-cluster.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_PASS_FILE=$STATE/db-password
NODE=$(hostname -s)
T0=$(date +%s%N)

elapsed() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
say() { printf '[dev-cluster %5ss] %s\n' "$(elapsed)" "$*"; }
die() { echo "dev-cluster: error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

# --- pid bookkeeping ---------------------------------------------------------------
# A pid counts as ours only while /proc/<pid>/comm still names the daemon, so a recycled
# pid is never signalled.
alive() {  # alive NAME COMM -> 0 if the recorded pid runs COMM
  local f=$STATE/started/$1.pid pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$2" ]]
}
record() { mkdir -p "$STATE/started"; echo "$2" >"$STATE/started/$1.pid"; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD... : poll CMD every 0.25 s
  local limit=$1 what=$2; shift 2
  local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || { say "timed out after ${limit} s waiting for $what"; return 1; }
    sleep 0.25
  done
}

pid_from_file() {  # pid_from_file FILE SECONDS -> prints the pid once the daemon wrote it
  local end=$(( $(date +%s) + $2 ))
  until [[ -s $1 ]]; do (( $(date +%s) < end )) || return 1; sleep 0.1; done
  cat "$1"
}

# --- install -------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
  if ((${#missing[@]} == 0)); then say "packages already installed"; return; fi
  command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian/Ubuntu packages (${PACKAGES[*]})"
  say "installing ${missing[*]} (apt-get update first)"
  # Package scripts must not start daemons: without systemd they would run untracked,
  # and `stop` could not tell them from daemons it owns. policy-rc.d 101 = "not allowed".
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1; fi
  local rc=0
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >"$STATE/log/apt.log" 2>&1
  } || rc=$?
  ((made_policy)) && rm -f "$policy"
  ((rc == 0)) || { tail -n 30 "$STATE/log/apt.log" >&2; die "apt-get install failed (log: $STATE/log/apt.log)"; }
  say "packages installed"
}

# --- configuration ----------------------------------------------------------------
check_ours() {  # never overwrite a Slurm config that someone else wrote
  [[ ! -e $1 ]] || head -n 1 "$1" | grep -qF "$MARKER" ||
    die "$1 exists and was not written by this script; refusing to overwrite a real cluster's config"
}

write_config() {
  check_ours "$CONF"; check_ours "$DBD_CONF"
  mkdir -p /etc/slurm "$STATE"/{ctld,spool,log,run}
  getent hosts "$NODE" >/dev/null || { echo "127.0.0.1 $NODE" >>/etc/hosts; say "added $NODE to /etc/hosts"; }

  # The node line comes from the hardware (`slurmd -C`); RealMemory at ~90% of what it
  # detects, because a node reporting less memory than configured is drained.
  local hw mem cpuline
  hw=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  cpuline=$(sed -e 's/ RealMemory=[0-9]*//' -e 's/ UpTime=.*//' <<<"$hw")
  [[ $cpuline == NodeName=* && -n $mem ]] || die "could not parse 'slurmd -C' output: $hw"
  cpuline=${cpuline/NodeName=* CPUs/NodeName=$NODE CPUs}

  [[ -s $DB_PASS_FILE ]] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB_PASS_FILE"; chmod 600 "$DB_PASS_FILE"; }

  cat >"$CONF" <<EOF
$MARKER (edits are overwritten on start)
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials expire after 10 s instead of 120 s: a requeued job may start again ~11 s
# after it ended instead of ~121 s (preemption tests wait for this).
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# No cgroups in containers/CI: track processes by /proc, no task binding or accounting gather.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
$cpuline RealMemory=$(( mem * 9 / 10 )) NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

  cat >"$DBD_CONF" <<EOF
$MARKER (edits are overwritten on start)
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(<"$DB_PASS_FILE")
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBD_CONF"  # slurmdbd refuses a config other users can read (it holds the password)
}

# --- daemons -----------------------------------------------------------------------
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if alive munged munged; then say "munged already running (pid $(<"$STATE/started/munged.pid"))"; return; fi
  if munge_ok; then say "munged already running (not started here: stop leaves it alone)"; return; fi
  [[ -s /etc/munge/munge.key ]] || { (mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none); }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  rm -f /run/munge/munged.pid
  # munged refuses to run as root; it daemonizes and writes its own pid file.
  runuser -u munge -- /usr/sbin/munged
  record munged "$(pid_from_file /run/munge/munged.pid 10)" || die "munged did not write its pid file"
  wait_for 10 munged munge_ok || die "munged started but munge/unmunge fails"
  say "munged started (pid $(<"$STATE/started/munged.pid"))"
}

db_ok() { mariadb-admin --protocol=socket ping 2>/dev/null | grep -q alive; }

start_mariadb() {
  if alive mariadb mariadbd && db_ok; then say "MariaDB already running (pid $(<"$STATE/started/mariadb.pid"))"
  elif db_ok; then say "MariaDB already running (not started here: stop leaves it alone)"; else
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mariadb-install.log" 2>&1
    install -d -o mysql -g mysql -m 755 /run/mysqld
    rm -f /run/mysqld/mysqld.pid
    touch "$STATE/log/mariadb.log"; chown mysql:mysql "$STATE/log/mariadb.log"
    # Socket only: slurmdbd connects to "localhost", which the client library maps to the socket.
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
      --socket=/run/mysqld/mysqld.sock --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    record mariadb $!
    wait_for 60 mariadb db_ok || { tail -n 20 "$STATE/log/mariadb.log" >&2; die "MariaDB did not answer within 60 s"; }
    say "MariaDB started (pid $(<"$STATE/started/mariadb.pid"))"
  fi
  # Root authenticates through the unix socket on Debian; idempotent statements.
  mariadb --protocol=socket <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(<"$DB_PASS_FILE")';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(<"$DB_PASS_FILE")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm_daemon() {  # start_slurm_daemon NAME : slurmdbd | slurmctld | slurmd
  local name=$1 pidfile=$STATE/run/$1.pid
  if alive "$name" "$name"; then say "$name already running (pid $(<"$STATE/started/$name.pid"))"; return; fi
  if pgrep -x "$name" >/dev/null; then
    die "a $name not started by this script is running (pid $(pgrep -x "$name" | head -n 1)); stop it first"
  fi
  rm -f "$pidfile"
  "/usr/sbin/$name" || die "$name failed to start (log: $STATE/log/$name.log)"
  local pid
  pid=$(pid_from_file "$pidfile" 15) || { tail -n 20 "$STATE/log/$name.log" >&2; die "$name wrote no pid file"; }
  record "$name" "$pid"
  say "$name started (pid $pid)"
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
node_ok() { [[ $(sinfo -h -n "$NODE" -o %t 2>/dev/null) =~ ^(idle|mix|alloc|comp)$ ]]; }

cmd_start() {
  need_root
  mkdir -p "$STATE"/{log,started}
  install_packages
  write_config
  start_munge
  start_mariadb
  start_slurm_daemon slurmdbd
  wait_for 30 slurmdbd dbd_ok || { tail -n 20 "$STATE/log/slurmdbd.log" >&2; die "slurmdbd did not answer sacctmgr within 30 s"; }
  # Register the cluster before slurmctld connects, so accounting works from its first job.
  dbd_ok | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  start_slurm_daemon slurmctld
  wait_for 30 slurmctld scontrol ping || die "slurmctld does not answer 'scontrol ping' (log: $STATE/log/slurmctld.log)"
  start_slurm_daemon slurmd
  if ! wait_for 60 node node_ok; then
    sinfo -R >&2 || true
    tail -n 20 "$STATE/log/slurmd.log" >&2
    die "node $NODE is not idle after 60 s"
  fi
  echo "$(date -u +%FT%TZ) start $(elapsed)s" >>"$STATE/timings.log"
  say "cluster '$CLUSTER' up: $(sinfo -h -o '%P %D %c CPUs %m MB %t')"
}

stop_pid() {  # stop_pid NAME COMM : TERM, wait up to 20 s, then KILL
  local name=$1 comm=$2 pid i
  if ! alive "$name" "$comm"; then rm -f "$STATE/started/$name.pid"; return; fi
  pid=$(<"$STATE/started/$name.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 80; i++)); do
    [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$comm" ]] || break
    sleep 0.25
  done
  if [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$comm" ]]; then kill -KILL "$pid" 2>/dev/null || true; say "$name killed (pid $pid)"; else
    say "$name stopped (pid $pid)"; fi
  rm -f "$STATE/started/$name.pid"
}

cmd_stop() {
  need_root
  if alive slurmctld slurmctld; then
    # The cluster's jobs die with it rather than linger as orphaned job steps.
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      wait_for 30 jobs bash -c '[[ -z $(squeue -h -o %A 2>/dev/null) ]]' || say "jobs still listed after 30 s: $(squeue -h -o %A | tr '\n' ' ')"
    fi
  fi
  stop_pid slurmd slurmd
  stop_pid slurmctld slurmctld
  stop_pid slurmdbd slurmdbd
  stop_pid mariadb mariadbd
  stop_pid munged munged
  say "stopped"
}

cmd_status() {
  local up=0
  if ! command -v sinfo >/dev/null; then echo "Slurm is not installed (run: $0 start)"; exit 1; fi
  echo "== daemons started by dev-cluster.sh"
  local d comm
  for d in munged mariadb slurmdbd slurmctld slurmd; do
    comm=$d; [[ $d == mariadb ]] && comm=mariadbd
    if alive "$d" "$comm"; then echo "  $d: running (pid $(<"$STATE/started/$d.pid"))"; else echo "  $d: not started here"; fi
  done
  echo "== sinfo"; sinfo || up=1
  echo "== squeue"; squeue || up=1
  echo "== accounting (sacct)"; sacct -n -X -S now-1hours -o JobID,JobName,State | tail -n 5 || up=1
  node_ok || { echo "node $NODE is not up: $(sinfo -h -n "$NODE" -o '%t %E' 2>/dev/null)"; up=1; }
  ((up == 0)) && echo "cluster is up" || echo "cluster is NOT up"
  exit $up
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
