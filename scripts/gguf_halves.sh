#!/usr/bin/env bash
# Split the embedded model's GGUF into two ignored folders (.gguf1, .gguf2), each under the device
# tool's 64 MiB per call, to carry them in two consecutive calls to a warm GPU machine; there,
#   cat .gguf1/part.aa .gguf2/part.ab > /tmp/smollm2.gguf; export MESHSERVE_DEFAULT_GGUF=/tmp/smollm2.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(.venv/bin/python -c "from meshserve.models.resolve import default_gguf_path; print(default_gguf_path())")
grep -qx '/.gguf1/' .git/info/exclude || printf '/.gguf1/\n/.gguf2/\n' >> .git/info/exclude
rm -rf .gguf1 .gguf2 && mkdir -p .gguf1 .gguf2
split -n 2 "$src" /tmp/gguf-part.
mv /tmp/gguf-part.aa .gguf1/part.aa && mv /tmp/gguf-part.ab .gguf2/part.ab
ls -la .gguf1 .gguf2
