#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest; when one of them names a test
# file or folder (`./scripts/test.sh tests/unit -x`), only those run, else all of tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# OpenMPI and Slurm (Debian's packages) for the mpirun and srun/sbatch launch tests, when we are root on
# a Debian-like machine; the Slurm tests start their own one-node cluster (scripts/slurm_local.sh).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  command -v mpirun >/dev/null || missing="openmpi-bin libopenmpi-dev"
  command -v slurmd >/dev/null || missing="$missing slurm-wlm"
  if [ -n "$missing" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null 2>&1 \
      || echo "warning: could not install $missing; the mpirun / Slurm tests will be skipped"
  fi
fi
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Byte-compile our own modules once: with PYTHONDONTWRITEBYTECODE set (as on the project's machines) every
# process (servers, engine processes, ranks: hundreds in a run) would otherwise compile them again (~0.3 s each).
python -m compileall -q -j 0 meshserve >/dev/null || true
# UCX (NIXL's, ucxx's) with libibverbs but no InfiniBand device crashes at exit unless its ib module is off
[ -n "$(ls /sys/class/infiniband 2>/dev/null)" ] || export UCX_MODULES=${UCX_MODULES:-^ib}
where=tests
for arg in "$@"; do
  case $arg in -*) ;; *) [ -e "${arg%%::*}" ] && where= ;; esac
done
exec python -m pytest $where -q -p no:cacheprovider --durations=30 "$@"
