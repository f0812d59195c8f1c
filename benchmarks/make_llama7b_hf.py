"""Write a Llama-2-7B-shaped Hugging Face folder (config.json, sharded bf16 safetensors with
model.safetensors.index.json, a small tokenizer.json) without ever holding the model in memory, for the import
memory benchmark in BENCHMARKS.md: `/usr/bin/time -v tlm convert OUT --out RUN` reports the peak RSS.

The weights are zeros: only their size and layout matter for memory. Usage:
    python benchmarks/make_llama7b_hf.py [OUT]      (default /tmp/mem/hf7b; ~13.5 GB of disk)
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from transformer_lm.tokenizers import build_tokenizer

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("out", nargs="?", default="/tmp/mem/hf7b", help="Folder to write (~13.5 GB).")
out = Path(ap.parse_args().out)
out.mkdir(parents=True, exist_ok=True)
V, D, F, L = 32000, 4096, 11008, 32
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
          "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 32,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
          "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
(out / "config.json").write_text(json.dumps(config, indent=2))


def layer(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    shapes = {f"{p}self_attn.{n}_proj.weight": (D, D) for n in "qkvo"}
    shapes |= {f"{p}mlp.gate_proj.weight": (F, D), f"{p}mlp.up_proj.weight": (F, D), f"{p}mlp.down_proj.weight": (D, F)}
    return shapes | {f"{p}input_layernorm.weight": (D,), f"{p}post_attention_layernorm.weight": (D,)}


shards = [{"model.embed_tokens.weight": (V, D)}] + [layer(i) for i in range(L)]
shards[-1] |= {"model.norm.weight": (D,), "lm_head.weight": (V, D)}
per_file, weight_map, total = 4, {}, 0
groups = [dict(kv for s in shards[i:i + per_file] for kv in s.items()) for i in range(0, len(shards), per_file)]
for n, group in enumerate(groups, 1):
    name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
    tensors = {k: torch.zeros(shape, dtype=torch.bfloat16) for k, shape in group.items()}
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    total += sum(t.numel() * 2 for t in tensors.values())
    weight_map |= {k: name for k in group}
    del tensors
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}))
build_tokenizer("bpe", ["a small corpus for a placeholder tokenizer "] * 100, 300).hf.save(str(out / "tokenizer.json"))
print(f"wrote {out}: {total / 1e9:.2f} GB of bf16 weights in {len(groups)} shards")
