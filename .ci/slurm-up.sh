#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurm-wlm 22.05 and munge), for CI
# and for developers: installs the packages if needed, writes /etc/slurm/slurm.conf (only if
# there is none, or it is ours), and starts munged, slurmctld and slurmd. Idempotent: with a
# controller already answering it does nothing. No systemd: the daemons run in the background
# with their output on /dev/null (so they hold no caller's pipe open). Stop with slurm-down.sh.
# Needs root.
set -euo pipefail
STARTED=/run/qtui-slurm-up.started  # the daemons this script started (slurm-down.sh stops those)
MARK="# written by qtui .ci/slurm-up.sh"
CONF=/etc/slurm/slurm.conf

if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP" \
   && sinfo --noheader -o %T 2>/dev/null | grep -Eq "idle|mixed|alloc"; then
    echo "slurm-up: a cluster is already up"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm-up: needs root (installs packages, starts daemons)" >&2
    exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 85 / 100 / 1024 ))
if [ ! -f "$CONF" ] || grep -q "^$MARK" "$CONF"; then
    mkdir -p /etc/slurm
    cat > "$CONF" <<CONF
$MARK
ClusterName=qtui
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem_mb / cpus / 2 ))
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# finished jobs stay visible to scontrol for 5 minutes: their final state and reason
MinJobAge=300
# a job over its time limit gets SIGTERM, then SIGKILL 5 s later (tests stay short)
KillWait=5
OverTimeLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
chown munge:munge /run/munge

[ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || true; chown munge:munge /etc/munge/munge.key; }
if ! pgrep -u munge -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 </dev/null
    echo munged >> "$STARTED"
fi
if ! pgrep -x slurmctld >/dev/null; then
    /usr/sbin/slurmctld >/dev/null 2>&1 </dev/null
    echo slurmctld >> "$STARTED"
fi
if ! pgrep -x slurmd >/dev/null; then
    /usr/sbin/slurmd >/dev/null 2>&1 </dev/null
    echo slurmd >> "$STARTED"
fi

for _ in $(seq 1 60); do
    if sinfo --noheader -o %T 2>/dev/null | grep -Eq "idle|mixed|alloc"; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        echo "slurm-up: cluster up (node $host, $cpus CPUs, ${mem_mb} MB)"
        exit 0
    fi
    # a node left down or drained by an earlier run comes back
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    sleep 0.5
done
echo "slurm-up: the cluster did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
