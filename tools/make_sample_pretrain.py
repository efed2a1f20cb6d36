#!/usr/bin/env python3
"""Inputs for the demo sample model's "pretraining" (tools/pretrain_sample.sh runs the whole recipe).

The released PaliGemma was pretrained on generic captioning before anyone fine-tunes it on RISC, so
its zero-shot captions are short and generic (CIDEr 0.25 on RISC in the reference run). The demo's
tiny model gets the same kind of start:

  data OUT_DIR         fresh synthetic scenes (a different seed than the sample's RISC data, so no
                       test image is seen) captioned by one word for their background ("forest",
                       "sea", "desert", "area"), never by the object in them or in RISC's sentence
                       style: OUT_DIR/data/train-0000k-of-00002.parquet. Fine-tuning then has to
                       teach the objects and the style; zero-shot scores stay low but not zero.
  scale-embedding MODEL_DIR STD
                       rescales embed_tokens (F32, in place) to standard deviation STD. HF's random
                       init draws it with std 0.02; tied to the lm_head of a 64-wide model behind an
                       RMSNorm, that bounds every logit to about ±1.3, so no caption can become
                       likely (the loss cannot fall below ~6). 0.5 lets the model become confident.
Needs numpy, pillow and pyarrow.
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS, SHARDS, SEED = 400, 2, 11
EMBED_KEYS = ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight")


def generic_captions(scene, obj):
    from sample_data import SCENES
    word = SCENES[scene][1].split()[-1]  # the head noun of the background phrase
    return [word] * 5


def write_data(out_dir):
    from sample_data import make_rows, write_risc
    write_risc(make_rows(ROWS, seed=SEED, caption_fn=generic_captions, shuffle_seed=SEED, prefix="pretrain"),
               os.path.join(out_dir, "data"), SHARDS)


def scale_embedding(model_dir, std):
    path = os.path.join(model_dir, "model.safetensors")
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    key = next(k for k in EMBED_KEYS if k in header)
    info = header[key]
    assert info["dtype"] == "F32", f"{key}: expected F32, got {info['dtype']}"
    s, e = (8 + n + o for o in info["data_offsets"])
    w = np.frombuffer(bytes(blob[s:e]), dtype="<f4")
    blob[s:e] = (w * np.float32(std / w.std())).astype("<f4").tobytes()
    with open(path, "wb") as f:
        f.write(blob)
    print(f"{key}: std {w.std():.4f} -> {std}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "data":
        write_data(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "scale-embedding":
        scale_embedding(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit("usage: make_sample_pretrain.py data OUT_DIR | scale-embedding MODEL_DIR STD")
