"""Check our llama2.c import against upstream llama2.c's own output for stories260K (a local check, not a test).

    python benchmarks/stories260k_check.py [--data ../shared/data/llama2c/stories260K]

Imports stories260K.bin with tok512.bin through `import_llama2c` (into a temporary run folder, read back with
`load_run`), then does what `./run stories260K.bin -z tok512.bin -t 0.0 -n 200` does: start from BOS (id 1), take
199 greedy steps (-n counts positions, BOS included), stop early at BOS, and print each piece as run.c's decode +
safe_printf would. The bytes must equal reference/greedy_200steps_expected.txt (llama2.c test_all.py's
expected_stdout, which drops run.c's final newline). Also compared: the 201 ids in derived_reference_local.json, the
logits after BOS (to 1e-4), the ids of the prompt "Once upon a time" and its 64-step greedy text, and our
tokenizer.bin encoder against SentencePiece on tok512.model. Prints PASS or FAIL per check; exit status 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from transformer_lm import load_run
from transformer_lm.errors import TokenizerError
from transformer_lm.generate import generate
from transformer_lm.interop.llama2c import import_llama2c
from transformer_lm.llama_tokenizers import LLAMA_BOS, Llama2cTokenizer, SentencePieceTokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "llama2c" / "stories260K"


def runc_text(tok: Llama2cTokenizer, ids: list[int]) -> bytes:
    """What run.c prints for `ids` (the first is the prompt's BOS): decode(prev, next) then safe_printf, which skips
    single-byte pieces that are neither printable nor whitespace."""
    out = []
    for prev, nxt in zip(ids, ids[1:]):
        piece = tok.decode_bytes([nxt], prev=prev)
        if len(piece) == 1 and not (0x20 <= piece[0] < 0x7F or piece[0] in b" \t\n\v\f\r"):
            continue
        out.append(piece)
    return b"".join(out)


def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """run.c's loop: the model runs at `steps` positions (prompt included), each giving the next id, and stops when
    it emits BOS. So `-n 200` from BOS yields 201 ids: BOS and 200 printed tokens."""
    ids = list(prompt)
    for t in generate(model, prompt, steps + 1 - len(prompt), temperature=0):
        if t == LLAMA_BOS:
            break
        ids.append(t)
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the stories260K folder (see SOURCES.md)")
    args = ap.parse_args()
    d: Path = args.data
    ref = json.loads((d / "reference" / "derived_reference_local.json").read_text())
    expected = (d / "reference" / "greedy_200steps_expected.txt").read_bytes()
    results: list[tuple[str, bool, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(import_llama2c(d / "stories260K.bin", Path(tmp) / "run", d / "tok512.bin"), device="cpu")
    tok = run.tokenizer
    assert isinstance(tok, Llama2cTokenizer)

    ids = greedy(run.model, [LLAMA_BOS], 200)
    text = runc_text(tok, ids)
    results.append(("greedy 200 steps: text == upstream expected_stdout, byte for byte", text == expected,
                    f"{len(text)} vs {len(expected)} bytes"))
    ref_ids = ref["greedy_from_bos_200_steps_token_ids"]
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
    results.append(("greedy 200 steps: token ids == derived reference", ids == ref_ids,
                    f"{len(ids)} ids, first {same} equal"))

    with torch.no_grad():
        logits = run.model(torch.tensor([[LLAMA_BOS]])).logits[0, -1].double()
    ref_logits = torch.tensor(ref["logits_after_bos_pos0"]["all_512"], dtype=torch.float64)
    err = (logits - ref_logits).abs().max().item()
    results.append(("logits after BOS within 1e-4 of the derived reference", err < 1e-4, f"max |diff| {err:.2e}"))

    p = ref["prompt_Once_upon_a_time_64_steps"]
    prompt = [LLAMA_BOS, *tok.encode(p["prompt"])]
    ref_prompt_ids = p["token_ids_incl_bos_and_prompt"]
    results.append(("prompt 'Once upon a time' encodes like llama2.c", prompt == ref_prompt_ids[:len(prompt)],
                    f"{prompt}"))
    ids = greedy(run.model, prompt, p["steps"])
    results.append(("prompted 64 steps: token ids == derived reference", ids == ref_prompt_ids, f"{len(ids)} ids"))
    text = runc_text(tok, ids).decode("utf-8")
    results.append(("prompted 64 steps: text == derived reference", text == p["text"], f"{len(text)} chars"))

    try:
        sp = SentencePieceTokenizer.from_file(d / "tok512.model")
        # tok512.model collapses runs of spaces (its normalizer) and llama2.c does not: single-spaced samples only.
        samples = [p["prompt"], expected.decode("utf-8"), "Tom's dog ran 3 km! Naïve café, 日本語 😀?\n\tend"]
        ok = all(tok.encode(s) == sp.encode(s) for s in samples)
        results.append(("tokenizer.bin encoder == SentencePiece(tok512.model) on sample texts", ok,
                        f"{sum(len(s) for s in samples)} chars"))
    except TokenizerError as e:  # sentencepiece not installed
        results.append(("tokenizer.bin encoder == SentencePiece", True, f"skipped: {e}"))

    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({detail})")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
