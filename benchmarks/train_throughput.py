"""Training throughput of our `Transformer` against Hugging Face's `GPT2LMHeadModel`, same run, same machine (CPU).

    python benchmarks/train_throughput.py                       # both configs, defaults below (~3 min on 2 cores)
    python benchmarks/train_throughput.py --config tiny --steps 3 --rounds 2 --json /tmp/tp.json
    python benchmarks/train_throughput.py --config gpt2 --dtype bfloat16   # both under bf16 autocast

What is compared. Both models are built from a config (random weights, nothing is downloaded) with the same
architecture: learned positions, pre-norm LayerNorm, tanh-GELU MLP (HF's `gelu_new`), biases, tied LM head, dropout 0,
fp32 (or both under `torch.autocast` with `--dtype bfloat16`), HF in `attn_implementation="sdpa"` (`--hf-attn eager` for
the other path) and `use_cache=False`. Our weights are copied into the HF model and the two initial losses must agree,
which proves the architectures are the same. Both get the same batch, the same thread count, and the same optimizer: our
`train.make_optimizer` (AdamW, fused kernel, decay on matrices only), rebuilt with identical groups and hyper-parameters
for HF. One training step, timed as a whole, is forward with loss → backward → clip_grad_norm_(1.0) → optimizer.step →
zero_grad(set_to_none=True), in train() mode.

Method. `--warmup` untimed steps per model first (allocator, oneDNN primitive caches, lazy optimizer state). Then
`--rounds` rounds, each timing `--steps` consecutive steps of ours and of HF, who goes first alternating (A B, B A, A B,
…), short blocks so that load from other processes on a shared machine hits both alike. Reported: the median step time
of each over all its timed steps (and the fastest step), tokens/s = batch·seq / median, and the ratio ours/HF of
tokens/s (= HF's median step time over ours). In parentheses, a cross-check: the median over rounds of the within-round
ratio, which stays honest when the load changes between rounds. If the two ratios disagree by more than a few percent,
the machine was busy: rerun with more rounds.

Defaults. tiny: batch 16 × 256 (the whole context: ~4k tokens, a usual small-model CPU batch), 10 rounds × 5 steps.
gpt2 (124M): batch 1 × 1024, the full context: one sequence already costs ~0.9 TFLOP per step (≈ 5 s per step and
model at this 2-core machine's ~190 GFLOP/s), so batch 2 would double every step; 10 rounds × 1 step keep the whole
run near 3 minutes when the machine is idle.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config

from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.model import Transformer
from transformer_lm.optim import make_optimizer

DEFAULTS = {  # per config: batch, seq, warm-up steps, timed steps per round, rounds
    "tiny": dict(batch=16, seq=256, warmup=3, steps=5, rounds=10),
    "gpt2": dict(batch=1, seq=1024, warmup=1, steps=1, rounds=10),
}
# Our parameter names → GPT-2's (substring renames, applied in order); Conv1D weights are stored transposed.
RENAMES = [("tok_emb", "wte"), ("pos_emb", "wpe"), ("blocks.", "h."), ("norm1", "ln_1"), ("norm2", "ln_2"),
           ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("ffn.up", "mlp.c_fc"),
           ("ffn.down", "mlp.c_proj")]
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":  # tied to the token embedding
            continue
        key = "ln_f." + key.removeprefix("norm.") if key.startswith("norm.") else key
        for old, new in RENAMES:
            key = key.replace(old, new)
        out["transformer." + key] = value.t() if key.endswith(CONV1D) else value
    return out


def build(name: str, hf_attn: str) -> tuple[Transformer, torch.nn.Module, ModelConfig]:
    cfg = ModelConfig.from_preset(name, dropout=0.0)
    assert (cfg.pos_encoding, cfg.norm, cfg.mlp, cfg.gelu_approximate) == ("learned", "layernorm", "gelu", "tanh")
    assert cfg.bias and cfg.tie_embeddings and cfg.kv_heads == cfg.n_head and cfg.ffn_dim == 4 * cfg.n_embd
    ours = Transformer(cfg).init_weights(seed=0)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ffn_dim, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
        use_cache=False, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
    )
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=hf_attn)
    assert hf.config._attn_implementation == hf_attn
    hf.loss_type = "ForCausalLM"  # what it would pick anyway, minus a warning
    missing, unexpected = hf.load_state_dict(to_hf_state(ours.state_dict()), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert ours.num_params() == hf.num_parameters(), (ours.num_params(), hf.num_parameters())
    return ours.train(), hf.train(), cfg


def hf_optimizer(hf: torch.nn.Module, like: torch.optim.AdamW) -> torch.optim.AdamW:
    """The groups of `make_optimizer` (decay on matrices, not on embeddings, biases, norms) with `like`'s settings."""
    emb = {id(hf.transformer.wte.weight), id(hf.transformer.wpe.weight)}
    decay = [p for p in hf.parameters() if p.dim() >= 2 and id(p) not in emb]
    no_decay = [p for p in hf.parameters() if p.dim() < 2 or id(p) in emb]
    wd = [g["weight_decay"] for g in like.param_groups]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd[0]}, {"params": no_decay, "weight_decay": wd[1]}],
                            **{k: like.defaults[k] for k in ("lr", "betas", "eps", "foreach", "fused")})
    assert opt.defaults == like.defaults
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in like.param_groups]
    return opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, hf: bool,
               dtype: torch.dtype = torch.float32) -> float:
    """One timed optimizer step (forward under autocast to `dtype` unless fp32). HF shifts `labels` itself; ours takes
    explicit next-token targets."""
    x = tokens[:, :-1]
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, labels=x).loss if hf else model(x, tokens[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench(name: str, args: argparse.Namespace) -> dict:
    d = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS[name].items()}
    ours, hf, cfg = build(name, args.hf_attn)
    dtype = getattr(torch, args.dtype)
    assert d["seq"] <= cfg.block_size, f"--seq {d['seq']} exceeds the block size {cfg.block_size}"
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (d["batch"], d["seq"] + 1), generator=gen)
    with torch.no_grad():  # same weights, same batch: the losses must agree if the architectures do
        x = tokens[:, :-1]
        a, b = ours(x, tokens[:, 1:]).loss.item(), hf(x, labels=x).loss.item()
    assert abs(a - b) < 1e-4 * max(1.0, abs(a)), f"initial losses differ: ours {a} vs HF {b}"
    contenders = {"ours": (ours, make_optimizer(ours, TrainConfig(), torch.device("cpu")), False)}
    contenders[f"hf-{args.hf_attn}"] = (hf, hf_optimizer(hf, contenders["ours"][1]), True)
    for model, opt, is_hf in contenders.values():
        for _ in range(d["warmup"]):
            train_step(model, opt, tokens, is_hf, dtype)
    times: dict[str, list[list[float]]] = {k: [] for k in contenders}  # per model, per round, per step
    for i in range(d["rounds"]):
        order = list(contenders.items())
        for key, (model, opt, is_hf) in (order if i % 2 == 0 else order[::-1]):  # who goes first alternates
            times[key].append([train_step(model, opt, tokens, is_hf, dtype) for _ in range(d["steps"])])
    n_tok = d["batch"] * d["seq"]
    rows = {}
    for key, per_round in times.items():
        flat = [t for r in per_round for t in r]
        rows[key] = {"median_s": statistics.median(flat), "min_s": min(flat),
                     "tokens_per_s": n_tok / statistics.median(flat), "times_s": per_round}
    ours_key, hf_key = contenders
    ratio = rows[ours_key]["tokens_per_s"] / rows[hf_key]["tokens_per_s"]
    # A cross-check robust to load that comes and goes: the ratio within each round (neighbours in time), median.
    paired = statistics.median(sum(h) / sum(o) for o, h in zip(times[ours_key], times[hf_key], strict=True))
    return {"config": name, **d, "dtype": args.dtype, "initial_loss": a, "params": ours.num_params(), "results": rows,
            "ratio": ratio, "paired_ratio": paired}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def git_revision() -> str:
    run = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    return run.stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["tiny", "gpt2", "both"], default="both")
    p.add_argument("--batch", type=int, help="sequences per step (default: 16 tiny, 1 gpt2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the block size, 256 / 1024)")
    p.add_argument("--warmup", type=int, help="untimed steps per model (default: 3 tiny, 1 gpt2)")
    p.add_argument("--steps", type=int, help="timed steps per model and round (default: 5 tiny, 1 gpt2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: 10 tiny, 10 gpt2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="autocast precision of both models' forward (bf16 runs on AMX units where the CPU has them)")
    p.add_argument("--hf-attn", choices=["sdpa", "eager"], default="sdpa", help="HF attention implementation")
    p.add_argument("--json", metavar="PATH", help="also write the results (with every step time) as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu": cpu_name(), "git": git_revision()}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'config':<6} {'model':<9} {'batch×seq':>10} {'steps':>5} {'median ms':>10} {'min ms':>9} {'tokens/s':>9}"
          "  ours/HF (paired)")
    runs = []
    for name in (["tiny", "gpt2"] if args.config == "both" else [args.config]):
        r = bench(name, args)
        runs.append(r)
        shape, ratio = f"{r['batch']}×{r['seq']}", f"{r['ratio']:.3f}× ({r['paired_ratio']:.3f}×)"
        for i, (key, row) in enumerate(r["results"].items()):
            print(f"{name:<6} {key:<9} {shape:>10} {r['rounds'] * r['steps']:>5} {1e3 * row['median_s']:>10.1f} "
                  f"{1e3 * row['min_s']:>9.1f} {row['tokens_per_s']:>9.0f}  {ratio if i == 0 else ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
