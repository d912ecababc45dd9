#!/usr/bin/env bash
# Test only: the checkpoints written by trainAndTest.sh with the same model_name, useNAM and seed.
#   bash test_few_shot.sh model_name device useNAM winmode win-size win-stride win-weight seed kshots
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/launch.py" test "$@"
