"""Direct preference optimization (preference.py) on preference pairs (chat_data.encode_pair). References: TRL's
dataset formats (a pair is its prompt followed by either completion, encoded as a prompt-completion example; an
implicit prompt is the two completions' common start), the paper's loss computed here on each sequence alone with
a naive log-softmax, its known start (ln 2 where the policy is the reference), a run trained in segments against one
trained at once, and held-out pairs ranked right after training."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model
from test_sft_data import CHATML, MESSAGES
from test_sft_data import tokenizer as chat_tokenizer  # noqa: F401 (a fixture)
from transformer_lm.api import load_run
from transformer_lm.chat_data import encode_chats, encode_example, encode_pair, joined
from transformer_lm.checkpoint import save_checkpoint
from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig, dump_json
from transformer_lm.errors import ConfigError, DataError
from transformer_lm.model import Transformer
from transformer_lm.preference import DPO, PairSampler
from transformer_lm.tokenizers import ByteTokenizer, save_tokenizer
from transformer_lm.train import read_metrics, train
from transformer_lm.train_data import training_data

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=256, dropout=0.0)
TOK = ByteTokenizer()


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, max_iters=6, eval_interval=6, eval_batches=2, log_interval=1, warmup_iters=2, lr=1e-3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A run folder holding an untrained model (GPT-2's init), the start and reference of the fine-tunes below."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(dump_json({"model": SMALL.to_dict()}))
    save_tokenizer(TOK, folder / "tokenizer.json")
    save_checkpoint(folder, Transformer(SMALL).init_weights(seed=0), {}, 1)
    return folder


def _copy_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Prompts "x<d>=" whose chosen answer repeats the digit and whose rejected one is another digit."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = rng.randrange(10)
            b = (a + rng.randrange(1, 10)) % 10
            f.write(json.dumps({"prompt": f"x{a}=", "chosen": f"{a}", "rejected": f"{b}"}) + "\n")
    return path


def test_pairs_are_their_prompt_followed_by_each_completion(request):
    tok = request.getfixturevalue("chat_tokenizer")
    row = {"prompt": "def alpha(beta):\n", "chosen": "    return beta\n", "rejected": "    pass\n"}
    assert encode_pair(row, None, tok) == [encode_example({"prompt": row["prompt"], "completion": row[side]}, None,
                                                          tok) for side in ("chosen", "rejected")]
    # TRL's implicit prompt: the common start, the space before the first difference going with the completions
    implicit = encode_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."}, None, tok)
    explicit = encode_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, None, tok)
    assert implicit == explicit
    prompt, chosen, rejected = MESSAGES[:4], MESSAGES[4:], [{"role": "assistant", "content": "klein"}]
    sides = encode_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, CHATML, tok)
    assert sides == [encode_example({"prompt": prompt, "completion": c}, CHATML, tok) for c in (chosen, rejected)]
    assert encode_pair({"chosen": prompt + chosen, "rejected": prompt + rejected}, CHATML, tok) == sides
    assert [tok.decode([i for i, m in zip(*side) if m]) for side in sides] == ["größe<|im_end|>\n",
                                                                               "klein<|im_end|>\n"]


def test_bad_pairs_are_refused_naming_the_line(tmp_path: Path):
    cases = {"same": [{"prompt": "a", "chosen": "b", "rejected": "b"}],
             "mixed": [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"text": "abc"}],
             "types": [{"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}]}
    messages = {"same": "are the same", "mixed": "mixes preference pairs", "types": "not all texts"}
    for name, rows in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=messages[name]) as e:
            encode_chats([path], None, TOK)
        assert f"{path}:{len(rows)}:" in str(e.value)


def _naive_logp(model: Transformer, ids: list[int], mask: list[bool]) -> float:
    """The summed log-probability of a sequence's learned tokens, the sequence run alone, float64 log-softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])


def _naive_loss(kind: str, beta: float, eps: float, chosen: tuple[float, float, int],
                rejected: tuple[float, float, int]) -> float:
    """One pair's loss as its paper writes it, of each side's (log π, log π_ref, completion tokens)."""
    margin = beta * ((chosen[0] - chosen[1]) - (rejected[0] - rejected[1]))
    nll = {"sigmoid": math.log1p(math.exp(-margin)), "minus": math.log1p(math.exp(margin))}  # -log σ(±m)
    if kind == "sigmoid":
        return nll["sigmoid"]
    if kind == "hinge":
        return max(0.0, 1 - margin)
    if kind == "robust":
        return ((1 - eps) * nll["sigmoid"] - eps * nll["minus"]) / (1 - 2 * eps)
    h = (chosen[0] - chosen[1]) / chosen[2] - (rejected[0] - rejected[1]) / rejected[2]
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("kind,eps,nll_weight", [("sigmoid", 0, 0), ("hinge", 0, 0), ("ipo", 0, 0),
                                                 ("robust", 0.2, 0), ("sigmoid", 0, 0.7)],
                         ids=["sigmoid", "hinge", "ipo", "robust", "rpo"])
def test_the_loss_is_the_papers_on_each_sequence_alone(kind: str, eps: float, nll_weight: float):
    """Padded rows of pairs of unequal lengths, against each sequence run by itself: the loss (each kind, and RPO's
    NLL term: the chosen completions' tokens' mean), the reward accuracy and margin, with a policy and a reference
    that differ (two random models)."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefgh", k=rng.randrange(1, 8))) for _ in range(18)]
    rows = [{"prompt": words[n], "chosen": words[n + 1], "rejected": words[n + 2]} for n in range(0, 16, 2)]
    encoded = [side for row in rows for side in encode_pair(row, None, TOK)]
    ids, mask, starts = joined(encoded, np.dtype(np.int64))
    policy, reference = random_model(SMALL, seed=1, std=0.1), random_model(SMALL, seed=2, std=0.1)
    beta = 0.3
    dpo = DPO(policy, beta, reference, kind, eps, nll_weight)
    sampler = PairSampler(ids, mask, starts, batch_size=len(rows), block_size=SMALL.block_size, seed=0)
    x, y = sampler.next()
    loss, stats = dpo.loss(policy, x, y)
    order = sampler.order[: len(rows)].tolist()  # the pairs drawn, in the batch's order
    margins, losses, chosen_logp, chosen_tokens = [], [], 0.0, 0
    for i in order:
        sides = [(_naive_logp(policy, *side), _naive_logp(reference, *side), sum(side[1][1:]))
                 for side in encoded[2 * i: 2 * i + 2]]
        margins.append(beta * ((sides[0][0] - sides[0][1]) - (sides[1][0] - sides[1][1])))
        losses.append(_naive_loss(kind, beta, eps, *sides))
        chosen_logp, chosen_tokens = chosen_logp + sides[0][0], chosen_tokens + sides[0][2]
    expected = sum(losses) / len(losses) - nll_weight * chosen_logp / chosen_tokens
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    n = len(rows)
    assert float(stats[0]) / n == pytest.approx(expected, rel=1e-5)
    assert stats[1] == sum(m > 0 for m in margins) and 0 < stats[1] < n  # the random pair ranks some of each
    assert float(stats[2]) / n == pytest.approx(sum(margins) / n, rel=1e-4, abs=1e-6)
    assert x.shape[0] == 2 * n and (y[:, -1] >= 0).sum() >= 1  # padded to the longest row, which reaches the end


def test_the_sampler_takes_every_pair_once_an_epoch_and_ranks_split_its_batch():
    encoded = [side for i in range(10) for side in encode_pair({"prompt": f"p{i}", "chosen": "a" * (i + 1),
                                                                "rejected": "b"}, None, TOK)]
    ids, mask, starts = joined(encoded, np.dtype(np.int64))
    one = PairSampler(ids, mask, starts, batch_size=4, block_size=24, seed=3)
    drawn = [one.next() for _ in range(5)]  # 20 pairs: two epochs
    prompts = [[bytes(x[r, :2].tolist()).decode() for r in range(8)] for x, _ in drawn]
    assert all(p[:4] == p[4:] for p in prompts)  # a pair's chosen row, then (4 rows on) its rejected one
    firsts = [p for batch in prompts for p in batch[:4]]
    assert sorted(firsts[:10]) == sorted(firsts[10:]) == [f"p{i}" for i in range(10)]
    ranks = [PairSampler(ids, mask, starts, batch_size=4, block_size=24, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for x, y in drawn[:3]:
        parts = [rank.next() for rank in ranks]  # each: its 2 chosen rows, then its 2 rejected ones
        for whole, halves, pad in ((x, [p[0] for p in parts], 0), (y, [p[1] for p in parts], -1)):
            wide = [torch.nn.functional.pad(h, (0, whole.shape[1] - h.shape[1]), value=pad) for h in halves]
            assert torch.equal(torch.cat([h[:2] for h in wide] + [h[2:] for h in wide]), whole)


@pytest.mark.parametrize("kind,start", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 1.0),
                                        ("robust", math.log(2))])
def test_a_dpo_run_starts_where_its_loss_does_and_ranks_held_out_pairs_right(base: Path, tmp_path: Path,
                                                                             kind: str, start: float):
    """Every loss starts at its value for a zero margin (sigmoid and robust ln 2, hinge 1, IPO (1/(2β))² = 1 at
    β = 0.5) and learns the copy task's preference. IPO's minimum is a bounded margin, the log-ratios' difference
    1/(2β) per token (a reward margin of 0.5 on these one-token answers): it ranks the pairs without driving the
    answers' probabilities apart. The sigmoid losses (and the hinge's, beyond a margin of 1) keep pushing."""
    pairs = _copy_pairs(tmp_path / "pairs.jsonl", 300)
    data = training_data(pairs, TOK)
    assert data.pairs and data.manifest["val_conversations"] == 60  # 30 held-out pairs, two examples each
    run = tmp_path / "dpo"
    result = train(SMALL, _cfg(init_from=str(base), max_iters=300, eval_interval=300, lr=1e-2, batch_size=8,
                               eval_batches=4, dpo_beta=0.5, dpo_loss=kind,
                               dpo_label_smoothing=0.1 if kind == "robust" else 0.0), data, run, progress=False)
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(start, abs=1e-6)  # policy = reference: every reward 0
    assert records[0]["reward_accuracy"] == 0 and records[0]["reward_margin"] == 0
    assert result.val.pairs == 30 and result.val.accuracy >= 0.9 and result.val.loss < 0.85 * start
    # the API's evaluation of the same pairs, against the run it started from (its train.init_from)
    again = load_run(run, "cpu").evaluate(data.path)
    assert again.to_dict() == pytest.approx(result.val.to_dict(), rel=1e-5)
    if kind == "ipo":
        assert result.val.margin == pytest.approx(0.5, abs=0.05)
        return
    assert result.val.margin > 1
    if kind == "hinge":
        return
    # and of the ten answers, the model now puts the digit of its prompt first, where the untrained one did not
    digits = [ord(str(d)) for d in range(10)]
    first, chance = {}, {}
    for name in ("base", "dpo"):
        model = load_run(tmp_path / name, "cpu").model
        with torch.no_grad():
            probs = [model(torch.tensor([list(f"x{a}=".encode())])).logits[0, -1, digits].softmax(-1)
                     for a in range(10)]
        first[name] = sum(int(p.argmax()) == a for a, p in enumerate(probs))
        chance[name] = sum(float(p[a]) for a, p in enumerate(probs)) / 10  # of the right digit, among the ten
    assert first["dpo"] >= 8 and chance["dpo"] > 0.6 and first["base"] <= 3 and chance["base"] < 0.2


@pytest.mark.parametrize("lora_rank,quantize", [(0, None), (4, None), (4, "int8")], ids=["full", "lora", "qlora"])
def test_a_resumed_dpo_run_equals_one_trained_at_once(base: Path, tmp_path: Path, lora_rank: int,
                                                      quantize: str | None):
    """Full fine-tune (a frozen reference loaded from train.init_from again on resume, not the resumed weights) and
    LoRA (the reference: the adapters off, over a quantized base too); the pair sampler's epoch order resumes too
    (4 pairs a step of 24)."""
    data = training_data(_copy_pairs(tmp_path / "pairs.jsonl", 30), TOK)
    cfg = _cfg(init_from=str(base), max_iters=8, eval_interval=4, lr=3e-3, lora_rank=lora_rank,
               lora_quantize=quantize)
    train(SMALL, cfg, data, tmp_path / "once", progress=False)
    paused = train(SMALL, cfg, data, tmp_path / "twice", progress=False, stop_at=5)
    assert paused.interrupted
    train(SMALL, cfg, data, tmp_path / "twice", resume=True, progress=False)
    once, twice = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("once", "twice"))
    losses = [r["loss"] for r in once if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # each kind of reference is the policy at the start
    assert losses == pytest.approx([r["loss"] for r in twice if "loss" in r], rel=1e-6) and len(set(losses)) == 8
    assert once[-1]["val_loss"] == pytest.approx(twice[-1]["val_loss"], rel=1e-6)


def test_dpo_needs_a_starting_model_and_tlm_eval_scores_pairs(base: Path, tmp_path: Path, capsys):
    pairs = _copy_pairs(tmp_path / "pairs.jsonl", 20)
    with pytest.raises(ConfigError, match="--train.init_from RUN"):
        train(SMALL, _cfg(), training_data(pairs, TOK), tmp_path / "scratch", progress=False)
    with pytest.raises(ConfigError, match="--reference RUN"):
        load_run(base, "cpu").evaluate(pairs)
    assert main(["eval", str(base), "--data", str(pairs), "--reference", str(base)]) == 0
    assert "DPO loss 0.6931, reward accuracy 0.0%, margin 0.000  (20 pairs)" in capsys.readouterr().out


@pytest.mark.parametrize("settings,message", [
    ({"dpo_loss": "kto"}, "dpo_loss must be one of 'sigmoid', 'hinge', 'ipo', 'robust'"),
    ({"dpo_label_smoothing": 0.1}, "set --train.dpo_loss robust"),
    ({"dpo_loss": "robust", "dpo_label_smoothing": 0.5}, r"in \[0, 0.5\)"),
    ({"dpo_nll_weight": -1.0}, "dpo_nll_weight must be >= 0"),
    ({"dpo_beta": 0.0}, "dpo_beta must be > 0")])
def test_dpo_settings_out_of_range_are_named(settings: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        _cfg(**settings)
