#!/usr/bin/env python3
"""The demo's sample bundle (data/sample/): a tiny RISC-format dataset and a tiny PaliGemma-shaped model.

Writes
  data/sample/risc/data/train-0000k-of-00002.parquet
        an HF dataset directory in RISC's layout: `image` {bytes, path} (64x64 JPEG) and caption_1..5.
        Each image is a synthetic "remote-sensing" scene: a background class (forest, sea, desert,
        city) with one object class (a red-roofed building, a white ship, a black road, or nothing),
        plus noise. The five captions are templates over (scene, object), so the caption is a function
        of the image that a tiny model can learn.
  data/sample/model/
        a random-init PaliGemma checkpoint written by transformers (model.safetensors, config.json),
        a SentencePiece tokenizer trained on the captions and laid out like Gemma's (<pad>=0 <eos>=1
        <bos>=2 <unk>=3, byte fallback, then <loc..>/<seg..>, <image> the one added token), HF's
        tokenizer files and preprocessor_config.json (28 px, patch 14 -> 4 image tokens).

Run from the repository root (the reference env lacks pyarrow and protobuf; install them to a scratch
folder outside the env):
  /opt/pyref/venv/bin/python -m pip install --target /tmp/pyt pyarrow protobuf
  PYTHONPATH=/tmp/pyt /opt/pyref/venv/bin/python tools/make_sample.py
"""
import io
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from transformers import GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))
from processor_fixtures import hub_layout  # noqa: E402  (the Hub's tokenizer/preprocessor file layout)

import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2 as sp_pb  # noqa: E402

OUT = os.path.normpath(os.path.join(HERE, "..", "data", "sample"))
ROWS, SHARDS, STORED_PX, IMAGE_SIZE, PATCH = 400, 2, 64, 28, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

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


def make_dataset():
    rng = np.random.default_rng(7)
    rows = []
    for i in range(ROWS):
        scene = list(SCENES)[i % len(SCENES)]
        obj = OBJECTS[(i // len(SCENES)) % len(OBJECTS)]
        caps = captions(scene, obj)
        rows.append({"image": {"bytes": draw_image(rng, scene, obj), "path": f"sample_{i:04d}.jpg"},
                     **{f"caption_{k + 1}": caps[k] for k in range(5)}})
    random.Random(3).shuffle(rows)
    img_t = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    schema = pa.schema([pa.field("image", img_t)] + [pa.field(f"caption_{k + 1}", pa.string()) for k in range(5)])
    data_dir = os.path.join(OUT, "risc", "data")
    os.makedirs(data_dir)
    per = (ROWS + SHARDS - 1) // SHARDS
    for s in range(SHARDS):
        part = rows[s * per:(s + 1) * per]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, os.path.join(data_dir, f"train-{s:05d}-of-{SHARDS:05d}.parquet"), row_group_size=100)
    corpus = []
    for scene in SCENES:
        for obj in OBJECTS:
            corpus += captions(scene, obj)
    return corpus


def train_sentencepiece(work, corpus):
    path = os.path.join(work, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n".join(corpus * 20 + ["caption en", "describe en"] * 50) + "\n")
    prefix = os.path.join(work, "sp")
    spm.SentencePieceTrainer.train(
        input=path, model_prefix=prefix, model_type="bpe", vocab_size=400, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "\n"], num_threads=1, minloglevel=2)
    m = sp_pb.ModelProto()
    with open(prefix + ".model", "rb") as f:
        m.ParseFromString(f.read())
    for piece in [f"<loc{i:04d}>" for i in range(16)] + [f"<seg{i:03d}>" for i in range(4)]:
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, sp_pb.ModelProto.SentencePiece.USER_DEFINED
    return m.SerializeToString()


def make_model(corpus):
    model_dir = os.path.join(OUT, "model")
    work = tempfile.mkdtemp()
    try:
        os.makedirs(model_dir)
        tok_src = os.path.join(work, "tok")
        os.makedirs(tok_src)
        with open(os.path.join(tok_src, "tokenizer.model"), "wb") as f:
            f.write(train_sentencepiece(work, corpus))
        tokenizer = GemmaTokenizer.from_pretrained(tok_src)
        image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                  rescale_factor=1 / 255, image_seq_length=NUM_IMAGE_TOKENS)
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        processor.save_pretrained(model_dir)
        shutil.copy(os.path.join(tok_src, "tokenizer.model"), model_dir)
        hub_layout(model_dir, image_processor)
        image_token_id = processor.image_token_id
        with open(os.path.join(model_dir, "special_tokens_map.json"), "w") as f:
            json.dump({"additional_special_tokens": ["<image>"], "bos_token": "<bos>", "eos_token": "<eos>",
                       "pad_token": "<pad>", "unk_token": "<unk>"}, f, indent=2)
        with open(os.path.join(model_dir, "added_tokens.json"), "w") as f:
            json.dump({"<image>": image_token_id}, f, indent=2)
        vocab_rows = (len(processor.tokenizer) + 63) // 64 * 64
        config = PaliGemmaConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64, vision_use_head=False),
            text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=vocab_rows),
            image_token_index=image_token_id, projection_dim=64, hidden_size=64, vocab_size=vocab_rows,
            bos_token_id=2, eos_token_id=1, pad_token_id=0)
        torch.manual_seed(0)
        model = PaliGemmaForConditionalGeneration(config).eval()
        model.save_pretrained(model_dir)
        for f in ("generation_config.json",):
            p = os.path.join(model_dir, f)
            if os.path.exists(p):
                os.remove(p)
    finally:
        shutil.rmtree(work)


def main():
    if os.path.exists(OUT):
        for sub in ("risc", "model"):
            shutil.rmtree(os.path.join(OUT, sub), ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    corpus = make_dataset()
    make_model(corpus)


if __name__ == "__main__":
    main()
