#!/usr/bin/env bash
# Does bf16 autocast cost accuracy? Two identical short runs (same seed, data subset, schedule), differing
# only in --precision; compares validation metrics and time. Usage: benchmarks/bf16_vs_fp32.sh [DATA] [WEIGHTS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/dsb2018-stage1-train}
WEIGHTS=${2:-../shared/weights/mobilenet_v2_imagenet.safetensors}
export NO_ALBUMENTATIONS_UPDATE=1
for p in bf16-mixed 32; do
  if [ ! -f runs/precision-$p/model/metrics.json ]; then
    start=$(date +%s)
    .venv/bin/nucleiseg train --data "$DATA" --out runs/precision-$p --max-images 160 --epochs 4 --crops-per-image 2 \
      --precision $p --encoder-weights "$WEIGHTS" --quiet 2> runs/precision-$p.log
    echo "$p wall $(( $(date +%s) - start )) s"
  fi
done
.venv/bin/python - <<'PY'
import json
for p in ("bf16-mixed", "32"):
    v = json.load(open(f"runs/precision-{p}/model/metrics.json"))["validation"]
    c = json.load(open(f"runs/precision-{p}/model/config.json"))["training"]
    print(f"{p:>10}: DSB {v['dsb_score']:.3f}  AP50 {v['ap50']:.3f}  F1 {v['f1_50']:.3f}  "
          f"IoU {v['foreground_iou']:.3f}  acc {v['pixel_accuracy']:.4f}  train {c['wall_time_s']:.0f} s")
PY
