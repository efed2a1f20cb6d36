#!/usr/bin/env python3
"""The demo's synthetic RISC-format data (shared by make_sample.py and make_sample_pretrain.py).

Each image is a synthetic "remote-sensing" scene: a background class (forest, sea, desert, city) with
one object class (a red-roofed building, a white ship, a black road, or nothing), plus noise, stored
as a 64x64 JPEG. `captions(scene, obj)` gives the five RISC-style reference captions of a scene;
`write_risc(rows, out_dir, shards)` writes rows in RISC's HF layout (`image` {bytes, path} and
caption_1..5). Needs numpy, pillow and pyarrow only.
"""
import io
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

STORED_PX = 64

SCENES = {  # name -> (rgb, noun phrase used in captions)
    "forest": ((40, 110, 40), "a dense forest"),
    "sea": ((30, 70, 160), "the sea"),
    "desert": ((200, 170, 100), "a bare desert"),
    "city": ((120, 120, 120), "a dense residential area"),
}
OBJECTS = ["building", "ship", "road", "none"]
OBJECT_PHRASE = {"building": "a red building", "ship": "a white ship", "road": "a black road", "none": ""}


def captions(scene, obj):
    s = SCENES[scene][1]
    if obj == "none":
        return [f"There is {s} .", f"This is {s} .", f"The picture shows {s} .", f"It is {s} with nothing else .",
                f"Only {s} can be seen ."]
    o = OBJECT_PHRASE[obj]
    return [f"There is {o} in {s} .", f"{o[0].upper() + o[1:]} is in {s} .", f"The picture shows {o} in {s} .",
            f"We can see {o} in {s} .", f"{s[0].upper() + s[1:]} with {o} ."]


def draw_image(rng, scene, obj):
    base = np.array(SCENES[scene][0], dtype=np.float64)
    px = base + rng.normal(0, 12, size=(STORED_PX, STORED_PX, 3))
    img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    c = rng.integers(18, STORED_PX - 18, size=2)
    r = int(rng.integers(10, 15))
    if obj == "building":
        d.rectangle([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(210, 30, 30))
    elif obj == "ship":
        d.ellipse([c[0] - r, c[1] - r // 2, c[0] + r, c[1] + r // 2], fill=(245, 245, 245))
    elif obj == "road":
        d.rectangle([0, c[1] - 6, STORED_PX, c[1] + 6], fill=(15, 15, 15))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_rows(n, seed, caption_fn=captions, shuffle_seed=3, prefix="sample"):
    """n rows cycling over every (scene, object) pair, images drawn with numpy's default_rng(seed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = list(SCENES)[i % len(SCENES)]
        obj = OBJECTS[(i // len(SCENES)) % len(OBJECTS)]
        caps = caption_fn(scene, obj)
        rows.append({"image": {"bytes": draw_image(rng, scene, obj), "path": f"{prefix}_{i:04d}.jpg"},
                     **{f"caption_{k + 1}": caps[k] for k in range(5)}})
    random.Random(shuffle_seed).shuffle(rows)
    return rows


def write_risc(rows, data_dir, shards):
    """RISC's HF dataset layout: data/train-0000k-of-0000n.parquet, row groups of 100."""
    img_t = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    schema = pa.schema([pa.field("image", img_t)] + [pa.field(f"caption_{k + 1}", pa.string()) for k in range(5)])
    os.makedirs(data_dir)
    per = (len(rows) + shards - 1) // shards
    for s in range(shards):
        table = pa.Table.from_pylist(rows[s * per:(s + 1) * per], schema=schema)
        pq.write_table(table, os.path.join(data_dir, f"train-{s:05d}-of-{shards:05d}.parquet"), row_group_size=100)


def corpus():
    """Every reference caption once (the tokenizer's training text)."""
    out = []
    for scene in SCENES:
        for obj in OBJECTS:
            out += captions(scene, obj)
    return out




if __name__ == "__main__":
    # python3 tools/sample_data.py OUT_DIR ROWS [IMAGES_DIR N]: a RISC-format dataset of ROWS synthetic
    # rows (the GPU benchmarks' data: `eval --limit 500` needs >= 5000 rows for a 500-row test split),
    # and optionally the first N images as JPEG files plus a preprocess JSONL (`prompt` "caption en").
    import json
    import sys
    if len(sys.argv) not in (3, 5):
        sys.exit("usage: sample_data.py OUT_DIR ROWS [IMAGES_DIR N]")
    rows = make_rows(int(sys.argv[2]), seed=1234, shuffle_seed=1234, prefix="bench")
    write_risc(rows, os.path.join(sys.argv[1], "data"), max(1, len(rows) // 2000))
    if len(sys.argv) == 5:
        img_dir = sys.argv[3]
        os.makedirs(img_dir, exist_ok=True)
        with open(os.path.join(img_dir, "batch.jsonl"), "w") as f:
            for r in rows[:int(sys.argv[4])]:
                with open(os.path.join(img_dir, r["image"]["path"]), "wb") as im:
                    im.write(r["image"]["bytes"])
                f.write(json.dumps({"image": r["image"]["path"], "prompt": "caption en"}) + "\n")
