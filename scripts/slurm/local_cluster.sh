#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and for trying the sbatch recipes.
#
#   scripts/slurm/local_cluster.sh start    install (if needed) and start munged, slurmctld, slurmd
#   scripts/slurm/local_cluster.sh stop     stop the daemons this script started (by pid)
#   scripts/slurm/local_cluster.sh status   exit 0 when the cluster answers and its node is usable
#
# Needs root (slurmd launches job steps as the submitting user). When sbatch is missing it runs
# `apt-get update && apt-get install slurm-wlm munge` (Debian/Ubuntu). `start` is idempotent:
# a running cluster is left alone. Nothing under /etc/slurm is touched: the configuration,
# spool, state, logs and pid files live in $LOCAL_SLURM_DIR (default /tmp/router_upcycling_slurm)
# and clients find it through SLURM_CONF:
#
#   export SLURM_CONF=/tmp/router_upcycling_slurm/slurm.conf
#   sbatch --wait my_job.sbatch
#
# Non-default ports (LOCAL_SLURM_CTLD_PORT, LOCAL_SLURM_D_PORT) keep it clear of a real
# Slurm on the same machine. munged is reused when one already answers on the default socket.
set -euo pipefail

STATE_DIR="${LOCAL_SLURM_DIR:-/tmp/router_upcycling_slurm}"
CONF="$STATE_DIR/slurm.conf"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${LOCAL_SLURM_D_PORT:-16818}"
READY_TIMEOUT_S="${LOCAL_SLURM_READY_TIMEOUT_S:-60}"
export SLURM_CONF="$CONF"

log() { echo "[local_cluster] $*" >&2; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_answers() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is unavailable: install slurm-wlm and munge"
    log "installing slurm-wlm and munge with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 \
        || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if munge_answers; then
        log "munged already answers; reusing it"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge
    chmod 0600 /etc/munge/munge.key
    # munged runs as the munge user and cannot write into $STATE_DIR: copy its pid file there.
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    for _ in $(seq 50); do munge_answers && return 0; sleep 0.1; done
    die "munged started but does not answer"
}

write_conf() {
    # slurmd -C reports this machine's real CPU layout and memory: a node declared bigger than
    # it is would be drained.
    local node_line
    node_line="$(slurmd -C | head -n1)"
    local node_name
    node_name="$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node_line")"
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log"
    cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node test cluster.
ClusterName=local
SlurmctldHost=$node_name
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=10
$node_line State=UNKNOWN
PartitionName=debug Nodes=$node_name Default=YES MaxTime=INFINITE State=UP
EOF
}

cluster_ready() {
    pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" \
        && [[ "$(sinfo --noheader --format=%T 2>/dev/null | head -n1)" =~ ^(idle|mixed|allocated) ]]
}

start() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd starts job steps as the submitting user)"
    if cluster_ready; then
        log "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    local started=$SECONDS
    install_packages
    mkdir -p "$STATE_DIR"
    stop_daemons
    start_munge
    write_conf
    # -c: start from an empty job state, so jobs of a previous run are not resumed.
    slurmctld -c -f "$CONF" || die "slurmctld did not start (see $STATE_DIR/log/slurmctld.log)"
    slurmd -f "$CONF" || die "slurmd did not start (see $STATE_DIR/log/slurmd.log)"
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until cluster_ready; do
        if ((SECONDS > deadline)); then
            sinfo --long >&2 || true
            tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
            die "the node did not become idle within ${READY_TIMEOUT_S}s"
        fi
        sleep 0.5
    done
    log "ready in $((SECONDS - started))s: $(sinfo --noheader --format='%P %D node(s) %T %c CPUs' | head -n1)"
    log "use it with: export SLURM_CONF=$CONF"
}

stop_pidfile() {
    local pidfile="$1"
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
}

stop_daemons() {
    stop_pidfile "$STATE_DIR/slurmd.pid"
    stop_pidfile "$STATE_DIR/slurmctld.pid"
    stop_pidfile "$STATE_DIR/munged.pid"
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons; log "stopped" ;;
    status) cluster_ready ;;
    *) echo "usage: $0 start|stop|status   (state in \$LOCAL_SLURM_DIR, default /tmp/router_upcycling_slurm)" >&2; exit 2 ;;
esac
