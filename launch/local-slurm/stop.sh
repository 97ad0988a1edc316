#!/usr/bin/env bash
# Stops the cluster started by start.sh (its jobs, slurmd, slurmctld, munged) and removes its state.
set -u
STATE=${LOCAL_SLURM_DIR:-/tmp/alexnet-local-slurm}
scancel --full --user="$(id -un)" 2>/dev/null
pkill -x slurmd; pkill -x slurmctld; pkill -x munged
# The controller saves its state as it stops; a start.sh run before it is gone would find it
# still there, start none, and wait on a cluster without a controller.
for _ in $(seq 40); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x munged >/dev/null || break
    sleep 0.25
done
rm -rf "$STATE"
exit 0
