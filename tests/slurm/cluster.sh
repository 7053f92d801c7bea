#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the submitit-launcher tests
# (tests/test_slurm.py). Needs root, apt (Debian/Ubuntu) and no cgroups.
#
#   bash tests/slurm/cluster.sh start    # install if needed, configure, start, smoke-test
#   bash tests/slurm/cluster.sh status   # exit 0 when up and idle/usable, 3 when down
#   bash tests/slurm/cluster.sh stop     # cancel all jobs, stop only what `start` started
#
# Facts behind every choice are in ../shared/notes/slurm.md (one-node SLURM for Hydra's
# submitit launcher). `start` is idempotent: when the daemons it started are alive and
# the node answers, it does nothing. Any failure prints an error and exits non-zero, so CI
# fails instead of skipping the SLURM tests.
#
# Environment: SAESWEEP_SLURM_PARTITION (default "debug") names the one partition;
# SAESWEEP_SLURM_STATE (default /run/saesweep-slurm) holds the pid file.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PARTITION=${SAESWEEP_SLURM_PARTITION:-debug}
STATE_DIR=${SAESWEEP_SLURM_STATE:-/run/saesweep-slurm}
PIDS_FILE=$STATE_DIR/pids            # lines "name pid" for the daemons this script started
SACCT_LINK=/usr/local/bin/sacct
SACCT_MARK="saesweep sacct stand-in"
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
PACKAGES=(munge slurmctld slurmd slurm-client)

log() { echo "cluster.sh: $*" >&2; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }
# die_log LOG MESSAGE: die, showing the end of the daemon's log (CI output is all there is).
die_log() {
    local file=$1; shift
    if [ -r "$file" ]; then
        echo "cluster.sh: last lines of $file:" >&2
        tail -n 5 "$file" | sed 's/^/    /' >&2
    fi
    die "$* (log: $file)"
}

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"; }

# alive NAME PID: PID is a live process whose command name is NAME (guards against pid reuse).
alive() {
    [ -n "${2:-}" ] && [ -r "/proc/$2/comm" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]
}

recorded_pid() {
    [ -f "$PIDS_FILE" ] && awk -v n="$1" '$1 == n { print $2 }' "$PIDS_FILE" | tail -n1
    return 0
}

# pids_named NAME: live processes whose command name is NAME (no procps needed).
pids_named() {
    local f
    for f in /proc/[0-9]*/comm; do
        [ "$(cat "$f" 2>/dev/null)" = "$1" ] && { f=${f#/proc/}; printf '%s ' "${f%/comm}"; }
    done
    return 0
}

record_pid() {
    mkdir -p "$STATE_DIR"
    touch "$PIDS_FILE"
    grep -v "^$1 " "$PIDS_FILE" > "$PIDS_FILE.tmp" || true
    echo "$1 $2" >> "$PIDS_FILE.tmp"
    mv "$PIDS_FILE.tmp" "$PIDS_FILE"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

ctld_up() { scontrol ping 2>/dev/null | grep -q "UP"; }
node_state() { sinfo -h -n "$NODE" -p "$PARTITION" -o %T 2>/dev/null | head -n1; }
node_usable() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

ours_up() {
    alive slurmctld "$(recorded_pid slurmctld)" && alive slurmd "$(recorded_pid slurmd)" \
        && ctld_up && node_usable
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null && command -v srun >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get to install them"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # The postinst scripts would start the daemons through invoke-rc.d; block that, we
    # start our own. Only remove the policy file if we created it.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local ok=1
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2; then
        log "apt-get install failed; updating the package lists and retrying"
        apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 || ok=0
    fi
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || die "apt-get install ${PACKAGES[*]} failed"
    # On a systemd host the install may still have enabled/started the packaged services;
    # they would hold the ports and pid files. Stop them (they are not ours to keep).
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl stop slurmd slurmctld munge >/dev/null 2>&1 || true
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --force >/dev/null
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0600 /etc/munge/munge.key
    # No systemd: nothing creates /run/munge. Clients need to reach the socket: 0755.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0   # a working munged (ours from before, or the system's): reuse it
    fi
    local old
    old=$(recorded_pid munged)
    if alive munged "$old"; then
        die "munged pid $old (started by this script) is alive but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
    fi
    runuser -u munge -- /usr/sbin/munged || die_log /var/log/munge/munged.log "munged did not start"
    wait_for 10 munge sh -c 'munge -n | unmunge' || die_log /var/log/munge/munged.log "munge does not answer after 10 s"
    local pid
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    alive munged "$pid" || die "munged is answering but /run/munge/munged.pid has no live munged"
    record_pid munged "$pid"
}

write_conf() {
    local probe cpus mem
    probe=$(slurmd -C 2>/dev/null | head -n1) || die "'slurmd -C' failed"
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$probe")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$probe")
    [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs/RealMemory from 'slurmd -C': $probe"
    local tmp
    tmp=$(mktemp)
    cat > "$tmp" <<EOF
# Written by tests/slurm/cluster.sh (saesweep): a one-node cluster for the launcher tests.
# Why each key: ../shared/notes/slurm.md. Rewritten on every cold start.
ClusterName=saesweep
# Explicit 127.0.0.1: no DNS or /etc/hosts lookups. slurmd finds its entry by short hostname.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible after cred_expire + 1 s (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
SwitchType=switch/none
# No cgroups needed (containers often have no writable cgroup tree).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: the real sacct fails; tests/slurm/sacct stands in for it.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Default 30 s backfill / 60 s main loop left requeued jobs pending ~28 s longer.
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
# Several 1-CPU jobs share the node. CR_CPU (not CR_Core): on a hyperthreaded host a
# 1-CPU job must not be rounded up to a whole core.
SelectTypeParameters=CR_CPU_Memory
# Needed: without it a job with no --mem gets the whole node's memory and the next waits.
DefMemPerCPU=$((mem / cpus))
# Finished jobs stay visible to scontrol (and so to the sacct stand-in) for 1 h.
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
# A node that was DOWN comes back when slurmd registers.
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    install -d -m 0755 /etc/slurm
    if [ -f "$CONF" ] && ! grep -q "Written by tests/slurm/cluster.sh" "$CONF"; then
        cp -p "$CONF" "$CONF.saesweep-backup"
        log "kept the previous $CONF as $CONF.saesweep-backup"
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    install -d -o slurm -g slurm -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld /var/log/slurm /run/slurm
    install -d -m 0755 /var/lib/slurm/slurmd
}

install_sacct() {
    local current
    if [ -e "$SACCT_LINK" ] && ! grep -q "$SACCT_MARK" "$SACCT_LINK" 2>/dev/null; then
        die "$SACCT_LINK exists and is not our sacct stand-in; refusing to overwrite it"
    fi
    install -m 0755 "$HERE/sacct" "$SACCT_LINK"
    current=$(command -v sacct 2>/dev/null || true)
    if [ "$current" != "$SACCT_LINK" ]; then
        log "warning: 'sacct' on this PATH is $current, not $SACCT_LINK; put /usr/local/bin first for submitit"
    fi
}

start() {
    need_root
    if ours_up; then
        install_sacct
        log "already up (partition $PARTITION, node $NODE: $(node_state))"
        return 0
    fi
    # Half-up from an earlier run (a daemon died)? Stop what is left of ours first.
    if [ -s "$PIDS_FILE" ]; then
        log "cluster was partly up; restarting it"
        cancel_jobs
        stop_daemons
    fi
    install_packages
    for d in slurmctld slurmd; do
        if [ -n "$(pids_named "$d")" ]; then
            die "a $d that this script did not start is running (pid $(pids_named "$d")); stop it first"
        fi
    done
    start_munge
    write_conf
    install_sacct

    local ctld_log=/var/log/slurm/slurmctld.log slurmd_log=/var/log/slurm/slurmd.log pid
    rm -f /run/slurm/slurmctld.pid /run/slurm/slurmd.pid
    # -c: start clean, without job records from an earlier cluster.
    slurmctld -c || die_log "$ctld_log" "slurmctld did not start"
    wait_for 10 slurmctld test -s /run/slurm/slurmctld.pid || die_log "$ctld_log" "slurmctld wrote no pid file"
    pid=$(cat /run/slurm/slurmctld.pid)
    record_pid slurmctld "$pid"
    # It daemonizes before binding its port: watch for an early death, not only for "UP".
    wait_for 30 slurmctld sh -c "scontrol ping 2>/dev/null | grep -q UP || ! [ -d /proc/$pid ]" || true
    alive slurmctld "$pid" || die_log "$ctld_log" "slurmctld exited during startup"
    ctld_up || die_log "$ctld_log" "slurmctld is not answering 'scontrol ping' after 30 s"

    slurmd || die_log "$slurmd_log" "slurmd did not start"
    wait_for 10 slurmd test -s /run/slurm/slurmd.pid || die_log "$slurmd_log" "slurmd wrote no pid file"
    pid=$(cat /run/slurm/slurmd.pid)
    record_pid slurmd "$pid"
    alive slurmd "$pid" || die_log "$slurmd_log" "slurmd exited during startup"

    if ! wait_for 30 node node_usable; then
        # A node left DOWN/DRAINED by an earlier run: ReturnToService=2 usually clears it.
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        wait_for 15 node node_usable \
            || die_log "$slurmd_log" "node $NODE is '$(node_state)', not idle, after 45 s; see also 'scontrol show node $NODE'"
    fi
    timeout 60 srun -p "$PARTITION" -t1 true \
        || die_log "$ctld_log" "smoke test 'srun -t1 true' failed; see also $slurmd_log"
    log "up: partition $PARTITION (default), node $NODE $(sinfo -h -n "$NODE" -o '%c CPUs, %m MB'), sacct stand-in at $SACCT_LINK"
}

# stop_pid NAME: SIGTERM the recorded NAME, wait up to 20 s, then SIGKILL. Ours only.
stop_pid() {
    local pid
    pid=$(recorded_pid "$1")
    if alive "$1" "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while alive "$1" "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if alive "$1" "$pid"; then
            log "$1 (pid $pid) ignored SIGTERM for 20 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
}

stop_daemons() {
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    rm -f "$PIDS_FILE"
}

cancel_jobs() {
    ctld_up || return 0
    local ids
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    [ -n "${ids// /}" ] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    # Wait for the job steps to end before slurmd goes: stopping slurmd leaves running
    # slurmstepd processes behind as orphans. KillWait is 5 s.
    wait_for 30 jobs sh -c '[ -z "$(squeue -h -o %A 2>/dev/null)" ]' \
        || log "warning: jobs still listed after 30 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
}

stop() {
    need_root
    if [ ! -s "$PIDS_FILE" ]; then
        log "not started by this script (no $PIDS_FILE); nothing to stop"
        return 0
    fi
    cancel_jobs
    stop_daemons
    if grep -q "$SACCT_MARK" "$SACCT_LINK" 2>/dev/null; then
        rm -f "$SACCT_LINK"
    fi
    log "stopped"
}

status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        pid=$(recorded_pid "$name")
        if alive "$name" "${pid:-}"; then
            echo "$name: running (pid $pid, started by cluster.sh)"
        elif [ -n "${pid:-}" ]; then
            echo "$name: DEAD (recorded pid $pid)"; rc=3
        elif [ -n "$(pids_named "$name")" ]; then
            echo "$name: running (pid $(pids_named "$name"), not started by cluster.sh)"
        else
            echo "$name: not running"; rc=3
        fi
    done
    if ctld_up; then
        sinfo -o '%P %a %D %T %c %m' 2>/dev/null || true
        squeue 2>/dev/null || true
        node_usable || rc=3
    else
        echo "slurmctld: not answering"; rc=3
    fi
    echo "sacct: $(command -v sacct 2>/dev/null || echo none)$(grep -q "$SACCT_MARK" "$SACCT_LINK" 2>/dev/null && echo ' (stand-in)')"
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
