#!/usr/bin/env python3
"""The Python reference's training throughput on the same GPU, model and data as `paligemma train`,
for the ratio in bench/RESULTS.md: HF transformers + peft + bitsandbytes QLoRA with the reference
notebook's recipe (spec/qlora.md §0): NF4 double-quantized base (compute bf16), prepare_model_for_
kbit_training, vision tower + projector frozen, LoRA r 16 / alpha 32 / dropout 0.05 / rsLoRA on
q,k,v,o,gate,up,down, LoRA+ groups (B at 16x lr), AdamW(wd 1e-6), bf16 autocast, micro-batch 4 x
accumulation 4, gradient checkpointing (as the notebook), clipping 1.0. A plain loop instead of
Trainer (same math; no logging/saving overhead in the timing).

  python3 tools/bench_hf_train.py MODEL_DIR DATA_DIR [STEPS=20] [--no-gc]
prints one line: steps, samples/s over the steps after the first (warm-up), peak memory.
The model directory is `paligemma init`'s random-init PaliGemma-3B; DATA_DIR a RISC-format parquet
folder (tools/sample_data.py). Needs torch, transformers, peft, bitsandbytes, pyarrow, pillow.
"""
import glob
import io
import math
import sys
import time

import pyarrow.parquet as pq
import torch
from PIL import Image
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor


def rows(data_dir):
    for f in sorted(glob.glob(f"{data_dir}/data/*.parquet")):
        for r in pq.read_table(f).to_pylist():
            yield Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB"), r["caption_1"]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model_dir, data_dir = args[0], args[1]
    steps = int(args[2]) if len(args) > 2 else 20
    gc = "--no-gc" not in sys.argv
    torch.manual_seed(0)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, quantization_config=bnb,
                                                              device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    for n, p in model.named_parameters():
        if "vision_tower" in n or "multi_modal_projector" in n:
            p.requires_grad = False
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, use_rslora=True, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    opt = torch.optim.AdamW([{"params": a, "lr": 1e-4}, {"params": b, "lr": 1.6e-3}], weight_decay=1e-6)
    proc = PaliGemmaProcessor.from_pretrained(model_dir)
    load_s = time.time() - t0
    data = rows(data_dir)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        s0 = time.time()
        micro = []
        for _ in range(4):
            batch = [next(data) for _ in range(4)]
            micro.append(proc(text=["caption en"] * 4, images=[x for x, _ in batch], suffix=[c for _, c in batch],
                              return_tensors="pt", padding="longest").to(0))
        n_tok = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        for m in micro:
            m["pixel_values"] = m["pixel_values"].to(torch.bfloat16)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**m, num_items_in_batch=n_tok)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.time() - s0)
    steady = times[1:] if len(times) > 1 else times
    sps = 16 * len(steady) / sum(steady)
    print(f"hf_train: {steps} steps, {trainable} trainable, {sps:.2f} samples/s (steps 2..{steps}), "
          f"first step {times[0]:.1f} s, load {load_s:.0f} s, peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, gradient checkpointing {gc}, loss {out.loss.item():.4f}")


if __name__ == "__main__":
    main()
