#!/usr/bin/env bash
# A real Slurm (with accounting) on this machine, for development and CI: one node, or N
# compute nodes that are network namespaces on a private bridge.
#
#   slurm/dev-cluster.sh start [--nodes N]   install (once), configure and start munged, MariaDB,
#                                            slurmdbd, slurmctld and one slurmd per node; idempotent;
#                                            resumes its nodes left drained or down
#   slurm/dev-cluster.sh stop                cancel its jobs, stop exactly the daemons `start` started,
#                                            remove the namespaces, bridge, addresses and hosts lines
#   slurm/dev-cluster.sh status              daemons, nodes, sinfo, squeue; exit 0 iff every node is up
#   slurm/dev-cluster.sh exec NODE CMD...    run CMD on NODE: its network, hostname and hosts file
#   slurm/dev-cluster.sh kill-node NODE      SIGKILL every process of NODE, its slurmd too (a node
#                                            failure); the next `start` brings the node back
#
# --nodes 1 (the default): the machine itself is the node (`hostname -s` at 127.0.0.1).
# --nodes N >= 2: node i is `avsn<i>`, a network namespace with its own address
# $AVS_SLURM_SUBNET.(10+i) on the bridge avsdev0 (the controller side is $AVS_SLURM_SUBNET.1),
# its own hostname (UTS namespace) and its own slurmd; the namespaces have no default route,
# so nothing they send leaves the bridge. One slurmctld, slurmdbd and munged serve all nodes.
#
# Needs root and Debian 12 (Slurm 22.05 packages; iproute2 for N >= 2). No systemd: daemons are
# started by hand and every pid, namespace, link and hosts line this script made is recorded
# under $AVS_SLURM_DIR/started/, so `stop` never touches anything that was there before `start`.
# Logs: $AVS_SLURM_DIR/log/. Why each setting is there: docs/slurm.md and the comments below.
set -euo pipefail

STATE=${AVS_SLURM_DIR:-/var/lib/avs-dist-slurm}
CLUSTER=${AVS_SLURM_CLUSTER:-avsdev}
PARTITION=${AVS_SLURM_PARTITION:-debug}
SUBNET=${AVS_SLURM_SUBNET:-10.213.47}  # the first three octets of a private /24
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
MARKER="# written by avs-dist slurm/dev-cluster.sh"
HOSTS_MARK="# avs-dist dev-cluster"  # ends every /etc/hosts line this script adds
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_PASS_FILE=$STATE/db-password
CTL=$(hostname -s)  # slurmctld's host: the machine
BRIDGE=avsdev0
NODE_PREFIX=avsn
NS_PREFIX=avsdev-
CTL_ADDR=$SUBNET.1
T0=$(date +%s%N)

elapsed() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
say() { printf '[dev-cluster %5ss] %s\n' "$(elapsed)" "$*"; }
die() { echo "dev-cluster: error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

# --- nodes -----------------------------------------------------------------------
# NODES is the node count of the running (or about to start) cluster; $STATE/started/nodes
# keeps it between calls, so status/stop/exec know the layout `start` made.
NODES=1
load_nodes() { [[ -s $STATE/started/nodes ]] && NODES=$(<"$STATE/started/nodes") || NODES=1; }
node_names() {  # one name per line
  if ((NODES == 1)); then echo "$CTL"; else local i; for ((i = 1; i <= NODES; i++)); do echo "$NODE_PREFIX$i"; done; fi
}
node_index() { [[ $1 =~ ^$NODE_PREFIX([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 1 && BASH_REMATCH[1] <= NODES)) && echo "${BASH_REMATCH[1]}"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_ns() { echo "$NS_PREFIX$NODE_PREFIX$1"; }
node_veth() { echo "avsdev-v$1"; }  # the host side; it is eth0 inside the node
node_list() { ((NODES == 1)) && echo "$CTL" || echo "$NODE_PREFIX[1-$NODES]"; }

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

# Network objects `start` created, one "KIND NAME" per line (netns, link, etcnetns, hosts),
# so `stop` removes exactly those.
made() { grep -qxF "$1 $2" "$STATE/started/network" 2>/dev/null; }
note_made() { made "$1" "$2" || echo "$1 $2" >>"$STATE/started/network"; }

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
  ((NODES == 1)) || PACKAGES+=(iproute2)
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

# --- network: one namespace per node on a private bridge ------------------------------
subnet_free() {  # no address or route of this machine overlaps $SUBNET.0/24, except our bridge's
  [[ $SUBNET =~ ^(10\.[0-9]{1,3}|172\.(1[6-9]|2[0-9]|3[01])|192\.168)\.[0-9]{1,3}$ ]] ||
    die "AVS_SLURM_SUBNET=$SUBNET must be the first three octets of a private /24 (e.g. 10.213.47)"
  local clash
  clash=$( { ip -4 route show root "$SUBNET.0/24"; ip -4 route show match "$SUBNET.0/24"; } | grep -v '^default' |
    grep -v " dev $BRIDGE " || true)
  [[ -z $clash ]] || die "subnet $SUBNET.0/24 overlaps this machine's routes ($clash); pick another with AVS_SLURM_SUBNET"
}

# Every interface we make gets IPv6 off before it comes up: no link-local addresses, router
# solicitations or MLD reports; the nodes speak only IPv4 to each other and the controller.
no_ipv6() {  # no_ipv6 [NETNS] IFACE|all|default
  local f=/proc/sys/net/ipv6/conf/${*: -1}/disable_ipv6
  if (($# == 2)); then ip netns exec "$1" sh -c "[ ! -e $f ] || echo 1 > $f"; else [[ ! -e $f ]] || echo 1 >"$f"; fi
}

setup_bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    note_made link "$BRIDGE"
    no_ipv6 "$BRIDGE"
  elif ! made link "$BRIDGE"; then
    die "a network interface $BRIDGE that this script did not make exists; remove it or stop what made it"
  fi
  ip addr replace "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

setup_node_net() {  # setup_node_net I
  local i=$1 ns veth addr
  ns=$(node_ns "$i"); veth=$(node_veth "$i"); addr=$(node_addr "$i")
  if [[ ! -e /run/netns/$ns ]]; then
    ip netns add "$ns"
    note_made netns "$ns"
    no_ipv6 "$ns" all; no_ipv6 "$ns" default
  elif ! made netns "$ns"; then
    die "network namespace $ns exists but was not made by this script; remove it (ip netns del $ns) first"
  fi
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    no_ipv6 "$veth"
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  ip -n "$ns" addr replace "$addr/24" dev eth0
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  # No default route: an address outside the bridge is unreachable from inside the node.
  ! ip -n "$ns" route show default | grep -q . || die "namespace $ns has a default route; refusing to run nodes that can reach outside"
}

# The node's network namespace, a UTS namespace with its hostname, and a mount namespace
# in which its hosts file covers /etc/hosts. (Not `ip netns exec`: that remounts /sys, which
# hides /sys/fs/cgroup, and slurmd 22.05 will not start without it.)
in_node() {  # in_node I CMD...
  local i=$1 ns; shift
  ns=$(node_ns "$i")
  nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- \
    /bin/sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
    sh "/etc/netns/$ns/hosts" "$NODE_PREFIX$i" "$@"
}

hosts_lines() {  # the nodes' names, as every node and the machine resolve them
  local i; for ((i = 1; i <= NODES; i++)); do echo "$(node_addr "$i") $NODE_PREFIX$i"; done
}

write_hosts() {
  local i ns name existing
  # Inside a node /etc/netns/<ns>/hosts covers /etc/hosts (in_node, and `ip netns exec` does
  # the same): the controller's name is its bridge address there (127.0.0.1 would be the
  # node's own loopback).
  [[ -d /etc/netns ]] || { mkdir /etc/netns; note_made etcnetns /etc/netns; }
  for ((i = 1; i <= NODES; i++)); do
    ns=$(node_ns "$i")
    mkdir -p "/etc/netns/$ns"; note_made etcnetns "/etc/netns/$ns"
    { printf '127.0.0.1 localhost\n%s %s\n' "$CTL_ADDR" "$CTL"; hosts_lines; } >"/etc/netns/$ns/hosts"
  done
  # The machine's /etc/hosts gets one marked line per node, appended (other programs read the
  # file meanwhile: no rewrite while it is in use); `stop` removes exactly the marked lines.
  for ((i = 1; i <= NODES; i++)); do
    name=$NODE_PREFIX$i
    existing=$(grep -v -F "$HOSTS_MARK" /etc/hosts | awk -v n="$name" '$1 !~ /^#/ { for (f = 2; f <= NF; f++) if ($f == n) print }' || true)
    [[ -z $existing ]] || die "/etc/hosts already names $name ($existing); this script will not shadow it"
  done
  local wanted have
  wanted=$(hosts_lines | sed "s/\$/ $HOSTS_MARK node/")
  have=$(grep -F "$HOSTS_MARK node" /etc/hosts || true)
  if [[ $have != "$wanted" ]]; then
    [[ -z $have ]] || remove_hosts_lines "$HOSTS_MARK node"
    [[ -z $(tail -c 1 /etc/hosts) ]] || echo >>/etc/hosts  # a last line without its newline
    printf '%s\n' "$wanted" >>/etc/hosts
  fi
  note_made hosts /etc/hosts
}

remove_hosts_lines() {  # remove_hosts_lines MARK : rewritten in place, as it may be a bind mount
  grep -qF "$1" /etc/hosts || return 0
  local kept; kept=$(grep -v -F "$1" /etc/hosts || true)
  { [[ -z $kept ]] || printf '%s\n' "$kept"; } >/etc/hosts.avs-dist.tmp
  cat /etc/hosts.avs-dist.tmp >/etc/hosts; rm -f /etc/hosts.avs-dist.tmp
}

setup_network() {
  subnet_free
  setup_bridge
  local i; for ((i = 1; i <= NODES; i++)); do setup_node_net "$i"; done
  write_hosts
  say "network: bridge $BRIDGE $CTL_ADDR/24, nodes $(hosts_lines | tr '\n' ' ')"
}

remove_network() {
  local f=$STATE/started/network kind name pid
  [[ -s $f ]] || return 0
  # Processes still inside a node (a job step slurmd left behind, an `exec`) were started
  # there through this script's slurmd or `exec`: end them, or the namespace outlives `ip netns del`.
  while read -r kind name; do
    [[ $kind == netns && -e /run/netns/$name ]] || continue
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    wait_for 10 "processes in $name" bash -c "[[ -z \$(ip netns pids $name 2>/dev/null) ]]" ||
      for pid in $(ip netns pids "$name" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done <"$f"
  while read -r kind name; do
    case $kind in
      netns) ip netns del "$name" 2>/dev/null || true ;;  # its eth0 goes with it, and the veth peer with that
      link) ip link del "$name" 2>/dev/null || true ;;
      hosts) remove_hosts_lines "$HOSTS_MARK" ;;
    esac
  done <"$f"
  # /etc/netns/<ns> before /etc/netns itself (reverse order of creation).
  tac "$f" | while read -r kind name; do
    [[ $kind == etcnetns ]] || continue
    [[ $name == /etc/netns ]] && { rmdir "$name" 2>/dev/null || true; continue; }
    rm -f "$name/hosts"; rmdir "$name" 2>/dev/null || true
  done
  rm -f "$f"
  say "network removed (namespaces, bridge $BRIDGE, addresses, hosts lines)"
}

# --- configuration ----------------------------------------------------------------
check_ours() {  # never overwrite a Slurm config that someone else wrote
  [[ ! -e $1 ]] || head -n 1 "$1" | grep -qF "$MARKER" ||
    die "$1 exists and was not written by this script; refusing to overwrite a real cluster's config"
}

node_lines() {  # one NodeName line per node, the CPU line from the hardware (`slurmd -C`)
  local hw mem cpuline i
  hw=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  cpuline=$(sed -e 's/ RealMemory=[0-9]*//' -e 's/ UpTime=.*//' -e 's/^NodeName=[^ ]* //' <<<"$hw")
  [[ $cpuline == CPUs=* && -n $mem ]] || die "could not parse 'slurmd -C' output: $hw"
  # RealMemory at ~90% of what it detects (a node reporting less memory than configured is
  # drained), shared out between the nodes, which all live on this one machine.
  mem=$(( mem * 9 / 10 / NODES ))
  if ((NODES == 1)); then
    echo "NodeName=$CTL $cpuline RealMemory=$mem NodeAddr=127.0.0.1 State=UNKNOWN"
  else
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=$NODE_PREFIX$i $cpuline RealMemory=$mem NodeAddr=$(node_addr "$i") State=UNKNOWN"
    done
  fi
}

write_config() {
  check_ours "$CONF"; check_ours "$DBD_CONF"
  mkdir -p /etc/slurm "$STATE"/{ctld,spool,log,run}
  if ! getent hosts "$CTL" >/dev/null; then
    echo "127.0.0.1 $CTL $HOSTS_MARK controller" >>/etc/hosts; note_made hosts /etc/hosts; say "added $CTL to /etc/hosts"
  fi
  # Single node: everything on loopback. Several: the nodes reach slurmctld and slurmdbd at
  # the bridge address (their own 127.0.0.1 is inside their namespace).
  local ctl_addr=127.0.0.1 dbd_host=localhost
  ((NODES == 1)) || { ctl_addr=$CTL_ADDR; dbd_host=$CTL_ADDR; }
  local nodes; nodes=$(node_lines)

  [[ -s $DB_PASS_FILE ]] || { head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB_PASS_FILE"; chmod 600 "$DB_PASS_FILE"; }

  cat >"$CONF" <<EOF
$MARKER (edits are overwritten on start)
ClusterName=$CLUSTER
SlurmctldHost=$CTL($ctl_addr)
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
# A node whose slurmd stops answering is DOWN after 30 s (default 300 s), and its jobs end
# (NODE_FAIL) or requeue: the node-failure tests wait for this.
SlurmdTimeout=30
StateSaveLocation=$STATE/ctld
# %n: one spool, pid file and log per node (several slurmd share this machine's files).
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$dbd_host
JobCompType=jobcomp/none
$nodes
PartitionName=$PARTITION Nodes=$(node_list) Default=YES MaxTime=INFINITE State=UP
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
  # munged refuses to run as root; it daemonizes and writes its own pid file. Its socket
  # is a file under /run/munge, which the nodes' namespaces share with the machine.
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

foreign() {  # foreign COMM -> pids running COMM that this script did not start
  local pid f ours=" "
  for f in "$STATE"/started/*.pid; do [[ -s $f ]] && ours+="$(<"$f") "; done
  # A daemon's pre-fork parent may outlive the fork for seconds on a loaded machine: it is ours too.
  for pid in $ours; do ours+="$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') "; done
  for pid in $(pgrep -x "$1" || true); do [[ $ours == *" $pid "* ]] || echo "$pid"; done
}

start_slurm_daemon() {  # start_slurm_daemon NAME [NODE [NETNS]] : slurmdbd | slurmctld | slurmd
  local name=$1 node=${2:-} ns=${3:-} key=$1 pidfile=$STATE/run/$1.pid
  [[ -z $node ]] || { key=$name-$node; pidfile=$STATE/run/$name-$node.pid; }
  if alive "$key" "$name"; then say "$key already running (pid $(<"$STATE/started/$key.pid"))"; return; fi
  # A daemon that was just started may still show its pre-fork parent for a moment.
  local other tries
  for tries in 1 2 3 4 5 6 7 8; do other=$(foreign "$name" | head -n 1); [[ -n $other ]] || break; sleep 0.25; done
  [[ -z $other ]] || die "a $name not started by this script is running (pid $other); stop it first"
  rm -f "$pidfile"
  [[ -z $node ]] || mkdir -p "$STATE/spool/$node"  # SlurmdSpoolDir=.../%n: slurmd does not create it
  if [[ -z $node ]]; then
    "/usr/sbin/$name" || die "$name failed to start (log: $STATE/log/$name.log)"
  elif [[ -z $ns ]]; then
    /usr/sbin/slurmd -N "$node" || die "slurmd failed to start (log: $STATE/log/slurmd-$node.log)"
  else
    # Inside the node: the daemon and every job step it starts inherit its network,
    # hostname and hosts file.
    in_node "$(node_index "$node")" /usr/sbin/slurmd -N "$node" ||
      die "slurmd for $node failed to start (log: $STATE/log/slurmd-$node.log)"
  fi
  local pid log=$STATE/log/$key.log
  pid=$(pid_from_file "$pidfile" 15) || { tail -n 20 "$log" >&2; die "$key wrote no pid file"; }
  record "$key" "$pid"
  say "$key started (pid $pid${ns:+, netns $ns})"
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
nodes_ok() {  # every node of the cluster is usable
  local states; states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
  local n; for n in $(node_names); do grep -Eq "^$n (idle|mix|alloc|comp)\$" <<<"$states" || return 1; done
}

resume_held_nodes() {  # a drain or down that slurmctld kept from an earlier life of this cluster
  # (a full disk drains a node, `kill-node` downs one) would keep that node out for good: resume it.
  # A cause that is still there drains it again, and the wait below names it (sinfo -R).
  local node state reason held='^(drain|down|fail|failg)[*~#%$@^-]?$'  # sinfo %t, with its flags
  while read -r node state reason; do
    [[ $state =~ $held ]] || continue
    grep -qx "$node" <<<"$(node_names)" || continue
    scontrol update NodeName="$node" State=RESUME 2>/dev/null &&
      say "$node was $state (${reason:-no reason}): resumed"
  done < <(sinfo -h -N -p "$PARTITION" -o '%N %t %E' 2>/dev/null)
}

parse_start_args() {
  while (($#)); do
    case $1 in
      --nodes) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--nodes needs a number"; NODES=$2; shift 2 ;;
      --nodes=*) NODES=${1#--nodes=}; shift ;;
      *) die "start: unknown argument '$1' (usage: $0 start [--nodes N])" ;;
    esac
  done
  [[ $NODES =~ ^[0-9]+$ ]] && ((NODES >= 1 && NODES <= 32)) || die "--nodes must be between 1 and 32, got '$NODES'"
}

cmd_start() {
  need_root
  NODES=1
  parse_start_args "$@"
  mkdir -p "$STATE"/{log,started}
  if alive slurmctld slurmctld && [[ -s $STATE/started/nodes && $(<"$STATE/started/nodes") != "$NODES" ]]; then
    die "the dev cluster is running with $(<"$STATE/started/nodes") node(s); stop it first ($0 stop) to start $NODES"
  fi
  echo "$NODES" >"$STATE/started/nodes"
  install_packages
  ((NODES == 1)) || setup_network
  write_config
  start_munge
  start_mariadb
  start_slurm_daemon slurmdbd
  wait_for 30 slurmdbd dbd_ok || { tail -n 20 "$STATE/log/slurmdbd.log" >&2; die "slurmdbd did not answer sacctmgr within 30 s"; }
  # Register the cluster before slurmctld connects, so accounting works from its first job.
  dbd_ok | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  start_slurm_daemon slurmctld
  wait_for 30 slurmctld scontrol ping || die "slurmctld does not answer 'scontrol ping' (log: $STATE/log/slurmctld.log)"
  local i
  if ((NODES == 1)); then start_slurm_daemon slurmd "$CTL"; else
    for ((i = 1; i <= NODES; i++)); do start_slurm_daemon slurmd "$NODE_PREFIX$i" "$(node_ns "$i")"; done
  fi
  resume_held_nodes
  if ! wait_for 60 nodes nodes_ok; then
    sinfo -R >&2 || true
    tail -n 20 "$STATE"/log/slurmd-*.log >&2
    die "not every node is idle after 60 s"
  fi
  echo "$(date -u +%FT%TZ) start --nodes $NODES $(elapsed)s" >>"$STATE/timings.log"
  say "cluster '$CLUSTER' up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t %N')"
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
  local f
  for f in "$STATE"/started/slurmd-*.pid "$STATE"/started/slurmd.pid; do  # (slurmd.pid: an older version's)
    [[ -e $f ]] && stop_pid "$(basename "$f" .pid)" slurmd
  done
  stop_pid slurmctld slurmctld
  stop_pid slurmdbd slurmdbd
  stop_pid mariadb mariadbd
  stop_pid munged munged
  remove_network
  rm -f "$STATE/started/nodes"
  say "stopped"
}

cmd_status() {
  local up=0 d comm f i
  if ! command -v sinfo >/dev/null; then echo "Slurm is not installed (run: $0 start)"; exit 1; fi
  load_nodes
  echo "== daemons started by dev-cluster.sh"
  for d in munged mariadb slurmdbd slurmctld; do
    comm=$d; [[ $d == mariadb ]] && comm=mariadbd
    if alive "$d" "$comm"; then echo "  $d: running (pid $(<"$STATE/started/$d.pid"))"; else echo "  $d: not started here"; fi
  done
  echo "== nodes ($NODES)"
  for d in $(node_names); do
    local where="127.0.0.1 (this machine)" pid="not running"
    if ((NODES > 1)); then
      i=$(node_index "$d")
      where="$(node_addr "$i") in netns $(node_ns "$i")"
      [[ -e /run/netns/$(node_ns "$i") ]] || where+=" (MISSING)"
    fi
    alive "slurmd-$d" slurmd && pid="pid $(<"$STATE/started/slurmd-$d.pid")"
    echo "  $d: $where, slurmd $pid, $(sinfo -h -n "$d" -o '%t %E' 2>/dev/null || echo 'state unknown')"
  done
  ((NODES == 1)) || echo "  bridge $BRIDGE: $(ip -br -4 addr show dev "$BRIDGE" 2>/dev/null | awk '{print $2, $3}' || echo MISSING)"
  echo "== sinfo"; sinfo -N -l || up=1
  echo "== squeue"; squeue || up=1
  echo "== accounting (sacct)"; sacct -n -X -S now-1hours -o JobID,JobName,State,NodeList | tail -n 5 || up=1
  nodes_ok || { echo "not every node is up"; up=1; }
  ((up == 0)) && echo "cluster is up" || echo "cluster is NOT up"
  exit $up
}

cmd_exec() {  # cmd_exec NODE CMD... : as a job step on NODE would see the world
  need_root
  load_nodes
  (($# >= 2)) || die "usage: $0 exec NODE COMMAND [ARG...]"
  local node=$1 i; shift
  if ((NODES == 1)); then
    [[ $node == "$CTL" ]] || die "node '$node' is not in the cluster (nodes: $CTL)"
    exec "$@"
  fi
  i=$(node_index "$node") || die "node '$node' is not in the cluster (nodes: $(node_list))"
  [[ -e /run/netns/$(node_ns "$i") ]] || die "node $node has no namespace: is the cluster up? ($0 start --nodes $NODES)"
  in_node "$i" "$@"
}

cmd_kill_node() {  # cmd_kill_node NODE : a node failure, for tests; `start` brings the node back
  need_root
  load_nodes
  (($# == 1)) || die "usage: $0 kill-node NODE"
  ((NODES > 1)) || die "kill-node needs a cluster of namespace nodes ($0 start --nodes 2)"
  local i ns pids
  i=$(node_index "$1") || die "node '$1' is not in the cluster (nodes: $(node_list))"
  ns=$(node_ns "$i")
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  # shellcheck disable=SC2086
  [[ -z ${pids// /} ]] || kill -KILL $pids 2>/dev/null || true
  say "node $1: killed every process in $ns ($(wc -w <<<"$pids") incl. its slurmd); '$0 start --nodes $NODES' brings it back"
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  exec) shift; cmd_exec "$@" ;;
  kill-node) shift; cmd_kill_node "$@" ;;
  *) echo "usage: $0 start [--nodes N] | stop | status | exec NODE COMMAND... | kill-node NODE" >&2; exit 2 ;;
esac
