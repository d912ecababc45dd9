#!/usr/bin/env bash
# Embedded default: the full cross-dataset protocol (train on one dataset, k-shot test on the
# other, both ways) on two generated MVTec-layout datasets with tiny random-initialised backbones,
# on the CPU, in about a minute on 2 cores. METHOD=fdsl (default), dcpsfr, knn, anomalydino or subspacead; run several and
# the summary shows them side by side. Real data and weights: README.md, "Real datasets and weights".
# Pages to open in a browser: results/<run>/.../report.html (each test run), results/summary/
# comparison.html (all runs side by side) and results/predict_demo_<method>/index.html (predictions).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
data="${DEMO_DATA:-$here/generated}"
export METHOD="${METHOD:-fdsl}"

export MVTEC_ROOT="$data/synth_mvtec" MVTEC_NAME=synth_mvtec
export VISA_ROOT="$data/synth_visa" VISA_NAME=synth_visa
case "$METHOD" in
  dcpsfr) tiny="clip=tiny_clip,dino=tiny_dinov2"; epochs=12; winmode=nan ;;  # DCP-SFR scores whole images
  anomalydino) tiny=tiny_dinov2; epochs=; winmode="${DEMO_WINMODE:-nan}" ;;  # training-free, whole images as its authors
  subspacead) tiny=tiny_dinov2; epochs=; winmode=nan ;;  # training-free, DINOv2 features, whole images only
  *) tiny=tiny_clip; epochs=25; winmode="${DEMO_WINMODE:-mul}" ;;
esac
export FSAD_BACKBONE="${FSAD_BACKBONE:-$tiny}"
# FDSL: ~150 optimiser steps per training set, BatchNorm statistics need that many to settle.
# (training-free methods: no epochs to set)
if [ -n "$epochs" ]; then
  export FSAD_EPOCHS_MVTEC="${FSAD_EPOCHS_MVTEC:-$epochs}" FSAD_EPOCHS_VISA="${FSAD_EPOCHS_VISA:-$epochs}"
fi
# training references: DCP-SFR's come from its config (1, methods/configs/dcpsfr.json); FDSL's 4 here
if [ "$METHOD" != dcpsfr ]; then export FSAD_TRAIN_K_SHOT="${FSAD_TRAIN_K_SHOT:-4}"; fi
export FSAD_SAVE_IMAGES="${FSAD_SAVE_IMAGES:-2}"  # report.html: curves and the 2 most wrong images each way
export RESULTS_ROOT="${RESULTS_ROOT:-$here/results}"

# model_name device useNAM winmode win-size win-stride win-weight seed kshots (tiny grid: 16x16)
args=("demo_$METHOD" cpu 1 "$winmode" 8 2 0.5 0 1)
if [ -n "${DEMO_DRY_RUN:-}" ]; then  # the plan only: where each run would go (checks the settings above)
  exec "$py" "$here/launch.py" where "${args[@]}"
fi
"$py" "$here/data/synthetic.py" --demo-pair --out "$data"
bash "$here/trainAndTest.sh" "${args[@]}"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$py" -m utils.report aggregate "$RESULTS_ROOT" --out "$RESULTS_ROOT/summary"

# Predictions on photos the model never saw: synth_visa's candles, scored by the heads trained on
# synth_mvtec against one reference, with the threshold of that checkpoint's own synth_visa test.
IFS=$'\t' read -r _ _ ckpt run < <("$py" "$here/launch.py" where "${args[@]}" | grep "^synth_mvtec"$'\t')
if [ "$ckpt" = "-" ]; then model=(--method "$METHOD" --backbone "$FSAD_BACKBONE"); else model=(--checkpoint "$ckpt"); fi
windows=(--winmode "$winmode" --win-size 8 --win-stride 2)
"$py" "$here/predict.py" "${model[@]}" --refs "$VISA_ROOT/candle/train/good/000.png" \
    --images "$VISA_ROOT/candle/test/*/*.png" --out "$RESULTS_ROOT/predict_demo_$METHOD" \
    --threshold-from "$run" --category candle "${windows[@]}"
echo "pages: $RESULTS_ROOT/summary/comparison.html, $RESULTS_ROOT/predict_demo_$METHOD/index.html"
