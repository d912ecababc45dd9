#!/usr/bin/env bash
# Every GPU figure of the project in one command (bench/gpu_check.py; bench/README.md says more):
#   bash bench/gpu_check.sh OUTDIR              # a CUDA machine, at most 8 minutes
#   bash bench/gpu_check.sh --dry-run OUTDIR    # CPU, tiny random backbones, to check the script
# Writes OUTDIR/gpu_report.md, gpu_report.json and gpu_check_log.txt. Exit codes: 0 all figures,
# 1 a part failed or was cut off, 2 bad arguments, 3 no usable CUDA GPU (report still written),
# 128+N stopped by signal N.
#
# Wheels carried to a machine without internet (bench/README.md): *.whl files in the repository's
# .whl/ folder (or GPU_CHECK_WHEELS=DIR) are installed into a temporary folder put first on
# PYTHONPATH; GPU_CHECK_WHEELS=none turns this off. PYTHON picks the interpreter (default python3).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3 >/dev/null 2>&1; then py=python3; else py=python; fi
fi
wheels="${GPU_CHECK_WHEELS:-$repo/.whl}"
if [ "$wheels" != "none" ] && compgen -G "$wheels/*.whl" >/dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
  export GPU_CHECK_REMOVE_AT_EXIT="$site"  # gpu_check.py removes it when it ends
  echo "gpu_check: installing the wheels of $wheels into $site"
  if ! PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" "$wheels"/*.whl; then
    echo "gpu_check: error: could not install the wheels in $wheels (see pip's message above)" >&2
    exit 2
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" "$here/gpu_check.py" "$@"  # exec: a signal sent to this script reaches the run
