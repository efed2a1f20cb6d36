#!/usr/bin/env python3
"""Generic-caption "pretraining" data for the demo's sample model (see tools/pretrain_sample.sh).

The released PaliGemma was pretrained on generic captioning before anyone fine-tunes it on RISC, so
its zero-shot captions are short and generic (CIDEr 0.25 on RISC in the reference run). The demo's
tiny model gets the same kind of start: fresh synthetic scenes (a different seed than the sample's
RISC data, so no test image is seen) captioned only by their background ("the sea"), never by the
object in them or in RISC's sentence style. Fine-tuning then has to teach the objects and the style.

  python3 tools/make_sample_pretrain.py OUT_DIR      # writes OUT_DIR/data/train-0000k-of-00002.parquet
Needs numpy, pillow and pyarrow.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample_data import SCENES, make_rows, write_risc  # noqa: E402

ROWS, SHARDS, SEED = 400, 2, 11


def generic_captions(scene, obj):
    phrase = SCENES[scene][1]
    return [phrase] * 5


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_sample_pretrain.py OUT_DIR")
    write_risc(make_rows(ROWS, seed=SEED, caption_fn=generic_captions, shuffle_seed=SEED, prefix="pretrain"),
               os.path.join(sys.argv[1], "data"), SHARDS)
