#!/usr/bin/env bash
# Starts a real SLURM cluster on this one machine: slurmctld and two slurmd daemons (nodes n1, n2),
# for trying the SLURM path on a laptop and for the tests. Needs root (and apt-get to install the
# Debian packages slurmctld slurmd slurm-client munge the first time). About 10 seconds.
#   sudo bash launch/local-slurm/start.sh        # then: sinfo, sbatch ..., squeue
#   sudo bash launch/local-slurm/stop.sh
set -euo pipefail
STATE=${LOCAL_SLURM_DIR:-/tmp/alexnet-local-slurm}
CPUS=${LOCAL_SLURM_CPUS:-2}   # CPUs each emulated node offers

if [ "$(id -u)" != 0 ]; then
    echo "error: the local SLURM cluster needs root (slurmd runs jobs as their users); run with sudo" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing the Debian packages slurmctld slurmd slurm-client munge ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
mkdir -p "$STATE"/state /etc/slurm
[ -f /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f >/dev/null
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

cat > /etc/slurm/slurm.conf <<CONF
# written by launch/local-slurm/start.sh: one controller and two nodes on $host
ClusterName=alexnetlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=4000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=4000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld -c
for node in n1 n2; do
    mkdir -p "$STATE/spool-$node"
    pgrep -f "slurmd -N $node" >/dev/null || slurmd -N "$node"
done
for _ in $(seq 60); do
    if [ "$(timeout 5 sinfo -h -o '%T' 2>/dev/null | sort -u)" = "idle" ]; then  # sinfo waits long without a controller
        sinfo
        exit 0
    fi
    sleep 0.5
done
echo "error: the nodes did not come up idle; see $STATE/*.log" >&2
sinfo >&2 || true
exit 1
