#!/usr/bin/env python3
"""The demo's sample bundle (data/sample/): a tiny RISC-format dataset and a tiny PaliGemma-shaped model.

Writes
  data/sample/risc/data/train-0000k-of-00002.parquet
        an HF dataset directory in RISC's layout: `image` {bytes, path} (64x64 JPEG) and caption_1..5,
        made by tools/sample_data.py: synthetic "remote-sensing" scenes whose five captions are
        templates over (scene, object), so the caption is a function of the image that a tiny model
        can learn.
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
import json
import os
import shutil
import sys
import tempfile

import torch
from transformers import GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))
from processor_fixtures import hub_layout  # noqa: E402  (the Hub's tokenizer/preprocessor file layout)

import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2 as sp_pb  # noqa: E402

OUT = os.path.normpath(os.path.join(HERE, "..", "data", "sample"))
ROWS, SHARDS, IMAGE_SIZE, PATCH = 400, 2, 28, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

from sample_data import corpus, make_rows, write_risc  # noqa: E402


def make_dataset():
    write_risc(make_rows(ROWS, seed=7), os.path.join(OUT, "risc", "data"), SHARDS)
    return corpus()


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
