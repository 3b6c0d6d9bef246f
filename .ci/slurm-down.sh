#!/usr/bin/env bash
# Stop the daemons that slurm-up.sh started (by their pid files); daemons it found running
# are left alone. Packages and configuration stay.
set -uo pipefail
STARTED=/run/qtui-slurm-up.started
[ -f "$STARTED" ] || { echo "slurm-down: nothing started by slurm-up.sh"; exit 0; }
for daemon in slurmd slurmctld munged; do
    grep -qx "$daemon" "$STARTED" || continue
    case $daemon in
        slurmd) pidfile=/run/slurmd.pid ;;
        slurmctld) pidfile=/run/slurmctld.pid ;;
        munged) pidfile=/run/munge/munged.pid ;;
    esac
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
done
rm -f "$STARTED"
echo "slurm-down: daemons stopped"
