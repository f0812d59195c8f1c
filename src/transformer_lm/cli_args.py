"""Parser pieces shared by the `tlm` commands of cli.py, cli_experiments.py and cli_sampling.py."""

from __future__ import annotations

from typing import TypeVar

from jsonargparse import ArgumentParser, Namespace

T = TypeVar("T")

TOKENIZER_HELP = "Tokenizer for raw text: byte, char, bpe (trained on the corpus) or gpt2 (needs --gpt2_dir)."


def add_tokenizer_args(p: ArgumentParser, prepared_too: bool = False) -> None:
    """`prepared_too`: the command also takes a folder `tlm prepare` wrote, which keeps its own tokenizer; the
    default is then None (byte for raw text), so that a --tokenizer given for such a folder can be refused, not
    silently ignored."""
    if prepared_too:
        p.add_argument("--tokenizer", type=str | None, default=None, help=TOKENIZER_HELP[:-1] + "; default byte. "
                       "A folder `tlm prepare` wrote keeps the tokenizer it was prepared with.")
    else:
        p.add_argument("--tokenizer", type=str, default="byte", help=TOKENIZER_HELP)
    p.add_argument("--vocab_size", type=int, default=4096, help="Vocabulary size of a trained bpe tokenizer.")
    p.add_argument("--gpt2_dir", type=str | None, default=None,
                   help="Folder with GPT-2's encoder.json and vocab.bpe (for --tokenizer gpt2).")


def config_from(cls: type[T], a: Namespace) -> T:
    """The config dataclass `cls` from the parsed fields it declares (added flat by add_class_arguments)."""
    return cls(**{k: a[k] for k in cls.__dataclass_fields__})
