#!/usr/bin/env bash
# Two Slurm "hosts" on this machine for the multi-node launcher test (Debian's slurm-wlm, as root):
# two network namespaces joined by a veth pair (10.79.0.1 and .2, named msn1 and msn2 in /etc/hosts),
# each with its own hostname (a UTS namespace), cgroup mounts and slurmd; slurmctld beside msn1's.
#   scripts/slurm_two_nodes.sh start DIR   -> prints the SLURM_CONF path; run srun with
#                                             `ip netns exec msna srun ...` (the controller's network)
#   scripts/slurm_two_nodes.sh stop DIR
set -euo pipefail
cmd=${1:?start or stop} dir=${2:?state folder}
conf=$dir/slurm.conf
A=msna B=msnb
case $cmd in
start)
  mkdir -p "$dir/state" "$dir/spool-msn1" "$dir/spool-msn2" /run/munge
  pgrep -x munged >/dev/null || munged --force 2>/dev/null
  ip netns add $A; ip netns add $B
  ip link add vmsna type veth peer name vmsnb
  ip link set vmsna netns $A; ip link set vmsnb netns $B
  ip -n $A addr add 10.79.0.1/24 dev vmsna; ip -n $B addr add 10.79.0.2/24 dev vmsnb
  for ns in $A $B; do ip -n $ns link set lo up; done
  ip -n $A link set vmsna up; ip -n $B link set vmsnb up
  grep -q " msn1$" /etc/hosts || printf "10.79.0.1 msn1\n10.79.0.2 msn2\n" >> /etc/hosts
  cat > "$conf" <<EOF
ClusterName=meshserve2
SlurmctldHost=msn1(10.79.0.1)
SlurmctldPort=6917
SlurmdPort=6918
$("$(dirname "$0")/slurm_local.sh" common "$dir" -%n)
NodeName=msn1 NodeAddr=10.79.0.1 CPUs=4 RealMemory=4000 State=UNKNOWN
NodeName=msn2 NodeAddr=10.79.0.2 CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  # `ip netns exec` gives each command a fresh /sys without the cgroup mounts slurmd needs: remount
  # the host's cgroup v1 hierarchies (or v2) there first
  cat > "$dir/cgroups.sh" <<'EOF'
if ! awk '$3 == "cgroup" {found = 1} END {exit !found}' /proc/1/mounts; then  # the host runs cgroup v2
  mount -t cgroup2 none /sys/fs/cgroup
else
  mount -t tmpfs tmpfs /sys/fs/cgroup
  for c in $(awk '$3 == "cgroup" {print $2}' /proc/1/mounts | xargs -n1 basename); do
    mkdir -p /sys/fs/cgroup/$c
    opts=$c; [ "$c" = systemd ] && opts=none,name=systemd
    mount -t cgroup -o $opts cgroup /sys/fs/cgroup/$c 2>/dev/null || true
  done
fi
EOF
  SLURM_CONF=$conf ip netns exec $A unshare --uts sh -c "hostname msn1; slurmctld"
  for n in 1 2; do
    ns=$A; [ $n = 2 ] && ns=$B
    SLURM_CONF=$conf ip netns exec $ns unshare --uts sh -c "hostname msn$n; . $dir/cgroups.sh; slurmd -N msn$n" \
      || { echo "slurmd msn$n did not start: $(tail -3 "$dir/slurmd-msn$n.log" | tr '\n' ' ')" >&2; exit 1; }
  done
  for _ in $(seq 60); do
    if [ "$(SLURM_CONF=$conf ip netns exec $A sinfo -h -o %t 2>/dev/null)" = idle ]; then echo "$conf"; exit 0; fi
    sleep 0.5
  done
  echo "the two-node slurm did not come up; see $dir/*.log" >&2
  exit 1
  ;;
stop)
  for f in "$dir"/slurmd-msn1.pid "$dir"/slurmd-msn2.pid "$dir"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
  for ns in $A $B; do
    for pid in $(ip netns pids $ns 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  sed -i '/ msn[12]$/d' /etc/hosts
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
