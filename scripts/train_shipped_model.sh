#!/usr/bin/env bash
# Retrain the shipped segmentation model kintsugi_daemon/inference/models/kintsugi-unet.onnx exactly as it
# was trained: simulator data with Pt infiltration, 10 seeds x the 96:2:2 and 90:5:5 presets (94:3:3 and
# seeds >= 100 stay unseen for the held-out figures of benchmarks/bench_segmentation.py).
#
#   pip install -e '.[train]'        # torch + onnx, training only
#   scripts/train_shipped_model.sh   # ~18 min on 2 free CPU cores (data ~1 min, 20 epochs ~16 min)
#
# Interrupted runs resume from $DATA/kintsugi-unet.ckpt.pt; delete it to train from scratch.
#
# Environment: DATA (default build/shipped-model-data), OUT (default: the shipped model's path),
# BIN (default .venv/bin/ if present), SEEDS, PRESETS; extra arguments go to `kintsugi train`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$( [ -x .venv/bin/python ] && echo .venv/bin/ || echo "" )}
DATA=${DATA:-build/shipped-model-data}
OUT=${OUT:-kintsugi_daemon/inference/models/kintsugi-unet.onnx}
SEEDS=${SEEDS:-"1 2 3 4 5 6 7 8 9 10"}
PRESETS=${PRESETS:-"96:2:2 90:5:5"}

folders=()
for preset in $PRESETS; do
    for seed in $SEEDS; do
        dir="$DATA/${preset//:/-}_seed$seed"
        if [ ! -f "$dir/with-pt/dataset.json" ]; then
            "${BIN}kintsugi-sim" dataset --out "$dir" --slices 2 --seed "$seed" --preset "$preset" \
                --width-px 1024 --height-px 768
        fi
        folders+=("$dir/with-pt")
    done
done

"${BIN}kintsugi" train "${folders[@]}" --out "$OUT" \
    --arch unet --base-channels 16 --depth 3 \
    --epochs 20 --steps-per-epoch 50 --batch-size 12 --crop-px 160 --lr 3e-3 \
    --val-fraction 0.15 --rare-class-fraction 0.3 --tile 512 --seed 0 --threads 2 --opset 14 \
    --checkpoint "$DATA/kintsugi-unet.ckpt.pt" "$@"
