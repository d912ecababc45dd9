#!/usr/bin/env bash
# Embedded default: the full cross-dataset protocol (train on one dataset, k-shot test on the
# other, both ways) on two generated MVTec-layout datasets with tiny random-initialised backbones,
# on the CPU, in about a minute on 2 cores. METHOD=fdsl (default), dcpsfr, knn or subspacead; run several and
# the summary shows them side by side. Real data and weights: README.md, "Real datasets and weights".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
data="${DEMO_DATA:-$here/generated}"
export METHOD="${METHOD:-fdsl}"

"$py" "$here/data/synthetic.py" --demo-pair --out "$data"

export MVTEC_ROOT="$data/synth_mvtec" MVTEC_NAME=synth_mvtec
export VISA_ROOT="$data/synth_visa" VISA_NAME=synth_visa
case "$METHOD" in
  dcpsfr) tiny="clip=tiny_clip,dino=tiny_dinov2"; epochs=12; winmode=nan ;;  # DCP-SFR scores whole images
  subspacead) tiny=tiny_dinov2; epochs=25; winmode=nan ;;  # training-free, DINOv2 features, whole images
  *) tiny=tiny_clip; epochs=25; winmode="${DEMO_WINMODE:-mul}" ;;
esac
export FSAD_BACKBONE="${FSAD_BACKBONE:-$tiny}"
# FDSL: ~150 optimiser steps per training set, BatchNorm statistics need that many to settle.
export FSAD_EPOCHS_MVTEC="${FSAD_EPOCHS_MVTEC:-$epochs}" FSAD_EPOCHS_VISA="${FSAD_EPOCHS_VISA:-$epochs}"
export FSAD_TRAIN_K_SHOT="${FSAD_TRAIN_K_SHOT:-4}"
export RESULTS_ROOT="${RESULTS_ROOT:-$here/results}"

# model_name device useNAM winmode win-size win-stride win-weight seed kshots (tiny grid: 16x16)
bash "$here/trainAndTest.sh" "demo_$METHOD" cpu 1 "$winmode" 8 2 0.5 0 1
"$py" -m utils.report aggregate "$RESULTS_ROOT" --out "$RESULTS_ROOT/summary"
