#!/usr/bin/env bash
# A one-node Slurm cluster on this host for the launcher tests (Debian's slurm-wlm, as root):
# munged (shared, started if absent), slurmctld and slurmd with their config, state and logs in DIR.
#   scripts/slurm_local.sh start DIR [CTLD_PORT SLURMD_PORT]   -> prints the SLURM_CONF path
#   scripts/slurm_local.sh stop DIR
# The node offers 8 CPUs whatever the machine has (SlurmdParameters=config_overrides), so the
# tests can start more ranks than cores, as CPU ranks do elsewhere in the suite.
set -euo pipefail
cmd=${1:?start or stop} dir=${2:?state folder}
conf=$dir/slurm.conf
case $cmd in
start)
  ctld=${3:-6817} slurmd_port=${4:-6818}
  mkdir -p "$dir/state" "$dir/spool" /run/munge
  pgrep -x munged >/dev/null || munged --force 2>/dev/null
  host=$(hostname -s)
  cat > "$conf" <<EOF
ClusterName=meshserve
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$ctld
SlurmdPort=$slurmd_port
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$host CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  SLURM_CONF=$conf slurmctld
  SLURM_CONF=$conf slurmd
  for _ in $(seq 60); do
    if SLURM_CONF=$conf sinfo -h -o %t 2>/dev/null | grep -qx idle; then echo "$conf"; exit 0; fi
    sleep 0.5
  done
  echo "slurm did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  exit 1
  ;;
stop)
  for f in slurmd slurmctld; do
    [ -f "$dir/$f.pid" ] && kill "$(cat "$dir/$f.pid")" 2>/dev/null || true
  done
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
