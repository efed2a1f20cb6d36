#!/usr/bin/env bash
# The demo sample model's "pretraining", run once after tools/make_sample.py (which writes HF's random
# init into data/sample/model). Like the released PaliGemma, the sample base then knows generic
# captions before the demo fine-tunes it on RISC-style ones, so the demo's zero-shot column means
# something (a random base scores 0). Steps (tools/make_sample_pretrain.py says why for each):
#   1. embed_tokens rescaled to std 0.5
#   2. generic one-word captions of fresh synthetic scenes
#   3. tq itself trains a LoRA (r 16, every Linear incl. SigLIP's and the projector) on them
#   4. `paligemma merge` folds it into the weights, which replace data/sample/model/model.safetensors
# Needs a built build/bin/paligemma and python3 with numpy, pillow, pyarrow (PYTHONPATH may point at
# a pip --target folder). Deterministic: the same inputs give the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PG=${PG:-build/bin/paligemma}
MODEL=data/sample/model
if grep -q tq_sample_pretraining "$MODEL/config.json"; then
  echo "pretrain_sample: $MODEL is already pretrained; run tools/make_sample.py first" >&2
  exit 1
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cp -r "$MODEL" "$W/base"
python3 tools/make_sample_pretrain.py scale-embedding "$W/base" 0.5
python3 tools/make_sample_pretrain.py data "$W/pretrain_data"
"$PG" train --model "$W/base" --data "$W/pretrain_data" --out "$W/run" --dtype f32 --quant none \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0 --lr 1e-3 --lora-plus-ratio 16 --warmup-ratio 0.05 \
  --target-modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj out_proj fc1 fc2 linear \
  --max-steps 2000 --batch-size 16 --grad-accum 1 --test-size 0.01 --val-size 0.01 --log-every 250
"$PG" merge --model "$W/base" --adapter "$W/run/adapter" --out "$W/merged" --dtype f32
cp "$W/merged/model.safetensors" "$MODEL/model.safetensors"
python3 - "$MODEL/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["tq_sample_pretraining"] = "tools/pretrain_sample.sh: embedding std 0.5, LoRA r16 on generic one-word captions, merged"
json.dump(c, open(sys.argv[1], "w"), indent=2, sort_keys=True)
open(sys.argv[1], "a").write("\n")
PY
echo "pretrain_sample: wrote $MODEL/model.safetensors"
