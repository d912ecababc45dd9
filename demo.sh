#!/usr/bin/env bash
# Embedded default: the full FDSL protocol (train on one dataset, k-shot test on the other, both
# ways) on two generated MVTec-layout datasets with a tiny random-initialised CLIP, on the CPU.
# Takes about a minute on 2 cores. Real data and weights: README.md, "Real datasets and weights".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
data="${DEMO_DATA:-$here/generated}"

"$py" "$here/data/synthetic.py" --demo-pair --out "$data"

export MVTEC_ROOT="$data/synth_mvtec" MVTEC_NAME=synth_mvtec
export VISA_ROOT="$data/synth_visa" VISA_NAME=synth_visa
export FDSL_BACKBONE="${FDSL_BACKBONE:-tiny_clip}"
# ~150 optimiser steps per training set: BatchNorm statistics need that many to settle.
export FDSL_EPOCHS_MVTEC="${FDSL_EPOCHS_MVTEC:-25}" FDSL_EPOCHS_VISA="${FDSL_EPOCHS_VISA:-25}"
export FDSL_TRAIN_K_SHOT="${FDSL_TRAIN_K_SHOT:-4}"
export RESULTS_ROOT="${RESULTS_ROOT:-$here/results}"

# model_name device useNAM winmode win-size win-stride win-weight seed kshots (tiny grid: 16x16)
bash "$here/trainAndTest.sh" demo cpu 1 "${DEMO_WINMODE:-mul}" 8 2 0.5 0 1
"$py" -m utils.report aggregate "$RESULTS_ROOT" --model demo --out "$RESULTS_ROOT/demo/summary"
