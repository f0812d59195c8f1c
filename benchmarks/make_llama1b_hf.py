"""Write a Llama-3.2-1B-shaped transformers model with random bf16 weights and a small tokenizer.json, for the import
memory benchmark in BENCHMARKS.md: `/usr/bin/time -v tlm convert OUT --out RUN` then reports the peak RSS.

Usage: python benchmarks/make_llama1b_hf.py [OUT]   (default /tmp/mem/hf1b; needs transformers, ~3 GB of disk)
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from transformer_lm.tokenizers import build_tokenizer

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("out", nargs="?", default="/tmp/mem/hf1b", help="Folder to write (~3 GB).")
out = ap.parse_args().out
config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True)
with torch.device("meta"):
    model = LlamaForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)  # random weights: only the size and layout matter
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
model.save_pretrained(out)
build_tokenizer("bpe", ["a small corpus for a placeholder tokenizer "] * 100, 300).hf.save(f"{out}/tokenizer.json")
print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters in bf16")
