#!/usr/bin/env bash
# Stops the cluster started by start.sh (its jobs, slurmd, slurmctld, munged) and removes its state.
set -u
STATE=${LOCAL_SLURM_DIR:-/tmp/alexnet-local-slurm}
scancel --full --user="$(id -un)" 2>/dev/null
pkill -x slurmd; pkill -x slurmctld; pkill -x munged
sleep 1
rm -rf "$STATE"
exit 0
