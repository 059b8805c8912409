#!/usr/bin/env bash
# Retrain the shipped segmentation model kintsugi_daemon/inference/models/kintsugi-unet.onnx exactly as it
# was trained: simulator data of the 96:2:2 and 90:5:5 presets, seeds 1-6 each, every specimen rendered
# three ways (with Pt, partial infiltration, no Pt), so the model sees failed and partial infiltration.
# Preset 94:3:3 and seeds >= 100 stay unseen for the held-out figures of benchmarks/bench_segmentation.py.
#
#   pip install -e '.[train]'        # torch + onnx, training only
#   DEVICE=cuda THREADS=4 JOBS=12 scripts/train_shipped_model.sh   # as shipped: one H200, data 72 s, training 210 s
#   scripts/train_shipped_model.sh   # the same recipe on the CPU: hours on 2 cores (not bit-equal to the GPU's)
#
# Interrupted runs resume from $DATA/kintsugi-unet.ckpt.pt; delete it to train from scratch.
#
# Environment: DATA (default build/shipped-model-data), OUT (default: the shipped model's path),
# BIN (default .venv/bin/ if present), SEEDS, PRESETS, DATA_ONLY=1 (stop after the data), DEVICE (cpu or
# cuda), JOBS (specimens rendered in parallel, default 1); extra arguments go to `kintsugi train`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$( [ -x .venv/bin/python ] && echo .venv/bin/ || echo "" )}
DATA=${DATA:-build/shipped-model-data}
OUT=${OUT:-kintsugi_daemon/inference/models/kintsugi-unet.onnx}
SEEDS=${SEEDS:-"1 2 3 4 5 6"}
PRESETS=${PRESETS:-"96:2:2 90:5:5"}
DEVICE=${DEVICE:-cpu}
JOBS=${JOBS:-1}
THREADS=${THREADS:-2}

folders=()
for preset in $PRESETS; do
    for seed in $SEEDS; do
        dir="$DATA/${preset//:/-}_seed$seed"
        if [ ! -f "$dir/partial-pt/dataset.json" ]; then
            # up to JOBS specimens render at once (each is single-threaded)
            while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
            "${BIN}kintsugi-sim" dataset --out "$dir" --slices 2 --seed "$seed" --preset "$preset" \
                --width-px 1024 --height-px 768 --partial &
        fi
        folders+=("$dir/with-pt" "$dir/partial-pt" "$dir/without-pt")
    done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || exit 1; done
[ "${DATA_ONLY:-0}" = 1 ] && exit 0

"${BIN}kintsugi" train "${folders[@]}" --out "$OUT" \
    --arch unet --base-channels 16 --depth 3 \
    --epochs 30 --steps-per-epoch 200 --batch-size 24 --crop-px 192 --lr 3e-3 \
    --val-fraction 0.15 --rare-class-fraction 0.4 --tile 512 --seed 0 --threads "$THREADS" --opset 14 \
    --device "$DEVICE" --checkpoint "$DATA/kintsugi-unet.ckpt.pt" "$@"
