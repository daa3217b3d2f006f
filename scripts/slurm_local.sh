#!/usr/bin/env bash
# A one-node Slurm cluster on this host for the launcher tests (Debian's slurm-wlm, as root):
# munged (shared, started if absent), slurmctld and slurmd with their config, state and logs in DIR.
#   scripts/slurm_local.sh start DIR [CTLD_PORT SLURMD_PORT]   -> prints the SLURM_CONF path
#   scripts/slurm_local.sh stop DIR
#   scripts/slurm_local.sh common DIR [SUFFIX]            -> the settings scripts/slurm_two_nodes.sh shares
# The node offers 8 CPUs whatever the machine has (SlurmdParameters=config_overrides), so the
# tests can start more ranks than cores, as CPU ranks do elsewhere in the suite.
set -euo pipefail
cmd=${1:?start or stop} dir=${2:?state folder}
conf=$dir/slurm.conf

common_conf() {  # common_conf DIR SUFFIX: the settings both test clusters share (SUFFIX -%n: a slurmd per node)
  cat <<EOF
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$1/state
SlurmdSpoolDir=$1/spool$2
SlurmctldPidFile=$1/slurmctld.pid
SlurmdPidFile=$1/slurmd$2.pid
SlurmctldLogFile=$1/slurmctld.log
SlurmdLogFile=$1/slurmd$2.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
EOF
}

case $cmd in
common)  # for scripts/slurm_two_nodes.sh
  common_conf "$dir" "${3:-}"
  ;;
start)
  ctld=${3:-6817} slurmd_port=${4:-6818}
  mkdir -p "$dir/state" "$dir/spool" /run/munge
  pgrep -x munged >/dev/null || munged --force 2>/dev/null
  host=$(hostname -s)
  cat > "$conf" <<EOF
ClusterName=meshserve
SlurmctldHost=$host
SlurmctldPort=$ctld
SlurmdPort=$slurmd_port
$(common_conf "$dir" "")
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
