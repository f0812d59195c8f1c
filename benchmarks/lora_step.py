"""LoRA fine-tuning step: ours (lora.add_lora on our Transformer) against Hugging Face PEFT on GPT2LMHeadModel, same
run, same machine (CPU), with our own full fine-tuning step beside them for what LoRA saves.

    python benchmarks/lora_step.py                                  # gpt2 (124M), batch 1 × 1024, rank 8 (~2 min)
    python benchmarks/lora_step.py --config tiny --batch 16 --seq 256 --rounds 10 --steps 3
    pip install -e '.[bench]'                                       # the peers: transformers and peft

What is compared. The models of benchmarks/train_throughput.py (same config, our weights copied into HF's; their
initial losses must agree), each given rank-r adapters on every linear layer of the blocks (ours: qkv, proj, up,
down; PEFT: c_attn, c_proj, c_fc, the same layers), alpha 2r, dropout 0, the base frozen. PEFT's adapters get our A and
B, so after one identical AdamW step on the same batch the second losses must agree too (checked: it proves the two
train the same thing, not just run the same shapes). The optimizer is AdamW over the trained parameters alone (no
weight decay, fused where torch has it), for both. A step, timed whole: forward with loss, backward, clip_grad_norm_,
optimizer step, zero_grad. Rounds alternate who goes first, as in train_throughput.py. Reported: median step time,
tokens/s, ours/PEFT (paired, as there), and our full fine-tune's step time (all weights trained) over our LoRA's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import build, cpu_name, git_revision, train_step  # noqa: E402
from transformer_lm.config import TrainConfig  # noqa: E402
from transformer_lm.lora import LoRALinear, add_lora  # noqa: E402
from transformer_lm.optim import fused_adamw, make_optimizer  # noqa: E402

OUR_TO_HF = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}


def adapted(name: str, rank: int, hf_attn: str):
    from peft import LoraConfig, get_peft_model

    ours, hf, cfg = build(name, hf_attn)
    full = build(name, hf_attn)[0]  # our model again, every weight trained
    torch.manual_seed(0)
    add_lora(ours, rank, 2.0 * rank)
    hf = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                       target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    peft_modules = dict(hf.named_modules())
    with torch.no_grad():
        for key, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                i, rest = key.removeprefix("blocks.").split(".", 1)
                theirs = peft_modules[f"base_model.model.transformer.h.{i}.{OUR_TO_HF[rest]}"]
                theirs.lora_A["default"].weight.copy_(module.lora_a)
                theirs.lora_B["default"].weight.copy_(module.lora_b)
    ours_n = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    hf_n = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert ours_n == hf_n, (ours_n, hf_n)
    return ours, hf, full, cfg, ours_n


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    fused = fused_adamw(torch.device("cpu"))
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0,
                             fused=fused, foreach=not fused)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["tiny", "gpt2"], default="gpt2")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed steps per model and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--hf-attn", choices=["sdpa", "eager"], default="sdpa")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    print(f"torch={torch.__version__} transformers={transformers.__version__} peft={peft.__version__} "
          f"threads={torch.get_num_threads()} cpu={cpu_name()} git={git_revision()}")
    ours, hf, full, cfg, trained = adapted(args.config, args.rank, args.hf_attn)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    x = tokens[:, :-1]
    contenders = {"ours-lora": (ours, adamw(ours), False), "peft-lora": (hf, adamw(hf), True),
                  "ours-full": (full, make_optimizer(full, TrainConfig(weight_decay=0.0), torch.device("cpu")),
                                False)}
    with torch.no_grad():
        before = ours(x, tokens[:, 1:]).loss.item(), hf(x, labels=x).loss.item()
    assert abs(before[0] - before[1]) < 1e-4 * max(1.0, before[0]), f"initial losses differ: {before}"
    for model, opt, is_hf in list(contenders.values())[:2]:  # one identical step: the same update, if the same LoRA
        train_step(model, opt, tokens, is_hf)
    with torch.no_grad():
        after = ours(x, tokens[:, 1:]).loss.item(), hf(x, labels=x).loss.item()
    assert abs(after[0] - after[1]) < 1e-3 * max(1.0, after[0]), f"losses after one step differ: {after}"
    print(f"losses agree: initial {before[0]:.5f} / {before[1]:.5f}, after one step {after[0]:.5f} / {after[1]:.5f}")
    for model, opt, is_hf in contenders.values():
        for _ in range(args.warmup):
            train_step(model, opt, tokens, is_hf)
    times: dict[str, list[list[float]]] = {k: [] for k in contenders}
    for i in range(args.rounds):
        order = list(contenders.items())
        for key, (model, opt, is_hf) in (order if i % 2 == 0 else order[::-1]):
            times[key].append([train_step(model, opt, tokens, is_hf) for _ in range(args.steps)])
    median = {k: statistics.median(t for r in v for t in r) for k, v in times.items()}
    paired = statistics.median(sum(h) / sum(o) for o, h in zip(times["ours-lora"], times["peft-lora"], strict=True))
    n_tok = args.batch * args.seq
    total = sum(p.numel() for p in full.parameters())
    print(f"{args.config}: rank {args.rank}, {trained:,} of {total:,} parameters trained; batch "
          f"{args.batch}×{args.seq}, {args.rounds * args.steps} timed steps each")
    for key, m in median.items():
        print(f"  {key:<10} median {1e3 * m:8.1f} ms  {n_tok / m:8.0f} tokens/s")
    print(f"  ours/PEFT {median['peft-lora'] / median['ours-lora']:.3f}× (paired {paired:.3f}×); "
          f"our full fine-tune step / our LoRA step {median['ours-full'] / median['ours-lora']:.2f}×; "
          f"optimizer state {8 * trained / 2**20:.1f} MiB vs {8 * total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
