#!/usr/bin/env bash
# Give this machine a real single-node Slurm cluster (Debian's slurm-wlm 22.05) for
# tests/test_submit.py: munged, MariaDB + slurmdbd (sacct), slurmctld and slurmd, all started
# by hand (no systemd), all state under $SLURM_ROOT.
#
# Idempotent: installs only missing packages, starts only daemons that are not running, and
# returns as soon as `sinfo` shows the node usable. Run as root (jobs then run as root too).
# Client commands find the config at its compiled-in default, /etc/slurm/slurm.conf; the same
# path is also written as SLURM_CONF to $SLURM_ROOT/env for anything that wants to source it.
set -euo pipefail

ROOT=${SLURM_ROOT:-/var/tmp/synthflux-slurm}
CLUSTER=synthflux
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DB_PORT=${SLURM_DB_PORT:-3307} # not 3306: leave a system MariaDB alone
DB_PASS=synthflux-ci           # local-only account of a throwaway database
WAIT_S=${SLURM_WAIT_S:-60}
export SLURM_CONF=$CONF
t0=$EPOCHREALTIME

say() { echo "start-slurm: $*"; }
die() {
    echo "start-slurm: error: $*" >&2
    exit 1
}
elapsed() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "$what did not come up within ${limit}s (logs: $ROOT/log)"
        sleep 0.2
    done
}
running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Without a slurm.conf, clients spend a minute on a DNS lookup (configless mode): check first.
node_usable() { [[ -f $CONF ]] && sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }

# Every daemon alive and the node usable: nothing to do. (slurmctld keeps calling a node idle
# for SlurmdTimeout after its slurmd died, so check the daemons themselves too.)
daemons_alive() {
    local d
    for d in mysqld slurmdbd slurmctld slurmd; do running "$ROOT/run/$d.pid" || return 1; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}
if daemons_alive && node_usable; then
    say "cluster already up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
    exit 0
fi

# --- packages ---------------------------------------------------------------------------------
need=()
for pair in slurmctld:slurm-wlm slurmd:slurm-wlm slurmdbd:slurmdbd munged:munge \
    mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    say "installing ${need[*]}"
    apt-get update -qq
    # Services are started below, by hand: keep the packages' init scripts from trying.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
    say "installed in $(elapsed)s"
fi
t0=$EPOCHREALTIME # the cold start proper: daemons only

mkdir -p "$ROOT"/{log,state,spool,run,mysql}
HOST=$(hostname -s)

# --- munge: authenticates every Slurm message --------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged bash -c 'munge -n | unmunge'
    say "munged up"
fi

# --- MariaDB in $ROOT/mysql, then slurmdbd on it (sacct needs accounting) ----------------------
DB_SOCK=$ROOT/run/mysqld.sock
chown mysql:mysql "$ROOT/mysql"
if [[ ! -d $ROOT/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir="$ROOT/mysql" --skip-test-db \
        --auth-root-authentication-method=socket >"$ROOT/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed: see $ROOT/log/mariadb-install.log"
fi
if ! mariadb-admin --socket="$DB_SOCK" ping >/dev/null 2>&1; then
    chown mysql:mysql "$ROOT/run" "$ROOT/log"
    # setsid + nohup: the daemons outlive this script and the CI step that ran it.
    setsid nohup mariadbd --user=mysql --datadir="$ROOT/mysql" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$ROOT/run/mysqld.pid" \
        --log-error="$ROOT/log/mariadb.log" --innodb-use-native-aio=0 \
        --skip-name-resolve </dev/null >/dev/null 2>&1 &
    wait_for 30 MariaDB mariadb-admin --socket="$DB_SOCK" ping
    say "MariaDB up"
fi
mariadb --socket="$DB_SOCK" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

install -d -m 0755 "$CONF_DIR"
# slurmdbd refuses a config readable by others (it holds the database password).
install -m 0600 /dev/stdin "$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$ROOT/run/slurmdbd.pid
LogFile=$ROOT/log/slurmdbd.log
EOF

# --- slurm.conf: one node, the whole machine, as `slurmd -C` sees it ----------------------------
node=$(slurmd -C | head -1)
node=${node/NodeName=$HOST/NodeName=$HOST NodeAddr=127.0.0.1}
install -m 0644 /dev/stdin "$CONF" <<EOF
# Written by .ci/start-slurm.sh: a single-node test cluster, state under $ROOT.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential life and kill wait: requeues and cancels take seconds, not minutes.
AuthInfo=cred_expire=10
KillWait=5
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
# No cgroups in containers: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_interval=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
$node State=UNKNOWN
# Two jobs per CPU: test jobs spend most of their time importing, single-threaded.
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF
echo "export SLURM_CONF=$CONF" >"$ROOT/env"

if ! running "$ROOT/run/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    say "slurmdbd up"
fi
# slurmctld registers with an existing cluster record only.
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! running "$ROOT/run/slurmctld.pid"; then
    slurmctld
    wait_for 30 slurmctld scontrol ping
    say "slurmctld up"
fi
if ! running "$ROOT/run/slurmd.pid"; then
    slurmd -N "$HOST"
fi
end=$((SECONDS + WAIT_S))
until node_usable; do
    state=$(sinfo -h -N -o '%t' 2>/dev/null || true)
    if [[ $state == down* || $state == drain* ]]; then # e.g. left down by an earlier run
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    fi
    ((SECONDS < end)) || die "node $HOST is '${state:-?}', not idle, after ${WAIT_S}s (logs: $ROOT/log)"
    sleep 0.2
done
say "cluster up in $(elapsed)s: $(sinfo -h -N -o '%N %t %c CPUs %m MB'); SLURM_CONF=$CONF"
