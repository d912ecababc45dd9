#!/usr/bin/env bash
# Train FDSL on MVTec AD and on VisA, then test each on the other dataset.
#   bash trainAndTest.sh model_name device useNAM winmode win-size win-stride win-weight seed kshots
#   e.g. bash trainAndTest.sh fdsl 0 1 nan 13 2 0.5 14 1
# Dataset roots, backbone and schedule: environment variables listed in README.md ("Launchers").
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/launch.py" train_and_test "$@"
