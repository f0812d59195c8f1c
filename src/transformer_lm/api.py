"""The Python API: the CLI's verbs as functions, for notebooks and scripts.

    >>> import transformer_lm as tlm
    >>> run = tlm.load_run("runs/default")
    >>> print(run.generate("def main(", max_new_tokens=100, seed=0))
    >>> run.evaluate("some_text.txt").bpb
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chat import encode_rendered, read_chat_template, render_chat
from .chat_data import encode_chats, example_files, joined
from .checkpoint import checkpoint_step, is_sharded, latest_checkpoint, load_weights, write_weights
from .config import ModelConfig, SampleConfig, TrainConfig
from .data import encode_sources, is_prepared, load_prepared, resolve_sources
from .decode import DecodeStats
from .errors import ChatError, CheckpointError, ConfigError, DataError
from .evaluate import EvalResult, evaluate_tokens, predicted_bytes_per_token
from .generate import compiles, stream_text
from .model import Transformer, build_model
from .preference import DPO, PreferenceResult
from .recurrent import RecurrentLM
from .runtime import resolve_device
from .speculative import check_draft
from .tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """A trained model loaded from a run folder: its config, tokenizer and weights (latest checkpoint)."""

    path: Path
    config: dict[str, Any]
    model: Transformer | RecurrentLM
    tokenizer: Tokenizer
    step: int
    draft: Transformer | RecurrentLM | None = None
    """A smaller model with the same tokenizer for speculative decoding (set with `use_draft`)."""
    draft_k: int = 4
    """Draft proposals per target forward."""
    chat_template: str | None = None
    """The Jinja chat template of a chat model (the run folder's chat_template.jinja, kept by `tlm convert`; chat.py),
    None for a base model: a new one may be set here (chat.check_template checks it)."""

    def quantize(self, bits: int, group_size: int = 128, dynamic: bool = False) -> Run:
        """Swap the model's linear layers for int8 (the LM head too) or group-wise int4 (not the head) weight-only
        versions, in place; returns self. `dynamic` (int8, CPU) quantizes the activations too, per call, for
        fbgemm's fast int8 kernels. For inference only: the run folder is not touched."""
        from .quantize import quantize

        quantize(self.model, bits, group_size, dynamic=dynamic)
        return self

    def use_decode_layout(self) -> Run:
        """Store the linear weights transposed ([in, out]) where that makes inference faster (float32 on a CPU:
        layout.decode_layout), in place; returns self. Call it after quantize(); the run folder is not touched."""
        from .layout import decode_layout

        decode_layout(self.model)
        return self

    def use_draft(self, draft: Run | str | Path | None, k: int = 4) -> Run:
        """Generate with speculative decoding, `draft` (a loaded run or a run folder, loaded on this run's device)
        proposing `k` tokens per step (None: plain decoding). The samples keep this run's distribution; the draft
        must share its tokenizer exactly."""
        if isinstance(draft, str | Path):
            draft = load_run(draft, str(self.model.tok_emb.weight.device))
        if draft is not None and draft.tokenizer.to_dict() != self.tokenizer.to_dict():
            raise ConfigError(f"the draft run {draft.path} has a different tokenizer from {self.path}; speculative "
                              f"decoding needs the same one")
        if k < 1:
            raise ConfigError(f"speculative decoding needs k >= 1 draft tokens per step, got {k}")
        if draft is not None:  # now, before a prompt is printed
            check_draft(self.model, draft.model, self.tokenizer.vocab_size)
        self.draft, self.draft_k = (draft.model if draft is not None else None), k
        return self

    def sample_config(self, cfg: SampleConfig) -> SampleConfig:
        """`cfg` as this run samples with it: compile turned off, with one warning, where no compiled step applies (a
        recurrent model: generate.compiles; speculative decoding runs both models on their dynamic caches)."""
        compile = compiles(self.model, cfg.compile)
        if compile and self.draft is not None:
            log.warning("compile applies to plain decoding's step; speculative decoding with a draft runs eagerly")
            compile = False
        return cfg if compile == cfg.compile else dataclasses.replace(cfg, compile=compile)

    def stream_samples(self, prompt: str, cfg: SampleConfig, stats: DecodeStats | None = None,
                       prompt_ids: list[int] | None = None) -> Iterator[Iterator[str]]:
        """cfg.num_samples streams of text pieces, drawn one after another from one seeded generator. `stats` is
        refilled with each sample's timings (prefill and decode tokens/s) as it is generated. `prompt_ids` are the
        prompt's own ids where they are not its plain encoding (generate.stream_text)."""
        if not isinstance(prompt, str):
            raise ConfigError(f"the prompt must be text (a str), got {type(prompt).__name__}; for token ids use "
                              "transformer_lm.generate.generate(run.model, ids, ...)")
        cfg = self.sample_config(cfg)  # warned once, not per sample
        gen = seeded_generator(cfg.seed, self.model)
        for _ in range(cfg.num_samples):
            yield stream_text(self.model, self.tokenizer, prompt, cfg, gen, self.draft, self.draft_k, stats,
                              prompt_ids)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    continue_final_message: bool = False) -> tuple[str, list[int]]:
        """The text and ids of `messages` in the run's chat template, ending in the header of the assistant's turn,
        or with `continue_final_message` in the last message's text, for the model to go on with (chat.render_chat,
        which also shows the template `tools`). ChatError for a run without a template, naming the fix."""
        if self.chat_template is None:
            raise ChatError(f"{self.path} has no chat template (a base model, trained to continue text): sample it "
                            "with a text prompt, or give it one (tlm serve --chat_template FILE, "
                            "Run.chat_template = ...)")
        text = render_chat(self.chat_template, messages, self.tokenizer, not continue_final_message, tools,
                           continue_final_message)
        return text, encode_rendered(self.tokenizer, text)

    def stream_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    **sample: Any) -> Iterator[str]:
        """Yield text pieces of the assistant's reply to `messages` (dicts of role and content) as they are
        generated; it ends at the model's end-of-turn token (one of its stop ids). With `tools` (chat_prompt), a
        reply may be tool calls, which tool_calls.parse_tool_calls reads. Keyword arguments are SampleConfig
        fields."""
        text, ids = self.chat_prompt(messages, tools)
        return next(self.stream_samples(text, SampleConfig(**{**sample, "num_samples": 1}), prompt_ids=ids))

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **sample: Any) -> str:
        """The assistant's reply to `messages` (see stream_chat)."""
        return "".join(self.stream_chat(messages, tools, **sample))

    def stream(self, prompt: str = "", **sample: Any) -> Iterator[str]:
        """Yield text pieces of one sample as they are generated; keyword arguments are SampleConfig fields."""
        return next(self.stream_samples(prompt, SampleConfig(**{**sample, "num_samples": 1})))

    def generate(self, prompt: str = "", **sample: Any) -> str | list[str]:
        """The generated continuation of `prompt` (without the prompt); a list when num_samples > 1."""
        cfg = SampleConfig(**sample)
        texts = ["".join(pieces) for pieces in self.stream_samples(prompt, cfg)]
        return texts[0] if cfg.num_samples == 1 else texts

    def evaluate(self, data: str | Path, batch_size: int = 8,
                 reference: str | Path | None = None) -> EvalResult | PreferenceResult:
        """Loss, perplexity and bits per byte on a text file, folder or glob, tokenized as `tlm prepare` does (an
        end-of-text between files), or on the val split of a folder `tlm prepare` wrote with this run's tokenizer.
        Of fine-tuning examples (a .jsonl file, or a folder chat_data.prepare_chats wrote), the tokens a fine-tune
        learns are scored (conversations' replies, rendered in the run's chat template, in the context of the turns
        before them; completions after their prompts). Of preference pairs, DPO's loss and reward accuracy against
        `reference` (a run folder; by default the one this run was fine-tuned from), with this run's DPO settings
        (train.dpo_beta, dpo_loss, dpo_label_smoothing, dpo_nll_weight)."""
        if (files := example_files(data)) is not None:
            encoded, pairs = encode_chats(files, self.chat_template, self.tokenizer)
            ids, mask, starts = joined(encoded, np.dtype(np.int64))
            if pairs:
                return self._evaluate_pairs(ids, mask, starts, batch_size, reference)
            return self._evaluate_replies(ids, mask, starts, batch_size)
        if is_prepared(data):
            prepared = load_prepared(data)
            if prepared.tokenizer.to_dict() != self.tokenizer.to_dict():
                raise DataError(f"{data} was prepared with another tokenizer than {self.path}'s; evaluate on the "
                                "text itself, or on data prepared for this run")
            if prepared.pairs:
                return self._evaluate_pairs(prepared.val, prepared.val_mask, prepared.val_starts, batch_size,
                                            reference)
            if prepared.val_mask is not None:
                return self._evaluate_replies(prepared.val, prepared.val_mask, prepared.val_starts, batch_size)
            bytes_per_token = predicted_bytes_per_token(self.tokenizer, prepared.val, prepared.manifest["val_bytes"])
            return evaluate_tokens(self.model, prepared.val, bytes_per_token, batch_size)
        ids, nbytes = encode_sources(resolve_sources(data), self.tokenizer)
        if len(ids) < 2:
            raise DataError(f"{data} holds fewer than 2 tokens; evaluate on a longer text")
        return evaluate_tokens(self.model, ids, predicted_bytes_per_token(self.tokenizer, ids, nbytes), batch_size)


    def _evaluate_pairs(self, ids: np.ndarray, mask: np.ndarray, starts: np.ndarray, batch_size: int,
                        reference: str | Path | None) -> PreferenceResult:
        """preference.DPO's evaluation of every pair, against the `reference` run (default: train.init_from)."""
        train = self.config.get("train", {})
        reference = reference or train.get("init_from")
        if reference is None:
            raise ConfigError(f"preference pairs are scored against a reference model, and {self.path} was not "
                              "fine-tuned from one: give it (tlm eval --reference RUN)")
        ref = load_run(reference, str(next(self.model.parameters()).device))
        if ref.tokenizer.to_dict() != self.tokenizer.to_dict() or ref.model.config.vocab_size != \
                self.model.config.vocab_size:
            raise ConfigError(f"the reference {reference} has another tokenizer or vocabulary than {self.path}; give "
                              "the run it was fine-tuned from")
        settings = {name: train.get(f"dpo_{name}", getattr(TrainConfig, f"dpo_{name}"))
                    for name in ("beta", "loss", "label_smoothing", "nll_weight")}
        dpo = DPO(self.model, reference=ref.model, **settings)
        return dpo.evaluate(ids, mask, starts, batch_size, self.model.config.block_size, None)

    def _evaluate_replies(self, ids: np.ndarray, mask: np.ndarray, starts: np.ndarray, batch_size: int) -> EvalResult:
        """evaluate_tokens scoring the tokens `mask` marks (the conversations' replies: each conversation, which
        `starts` locate, on its own), bits per byte of their text."""
        scored = np.asarray(ids[1:])[np.asarray(mask[1:], dtype=bool)]
        if not len(scored):
            raise DataError("the conversations hold no reply of the assistant's to score")
        bytes_per_token = self.tokenizer.num_bytes(scored.tolist()) / len(scored)
        return evaluate_tokens(self.model, ids, bytes_per_token, batch_size, mask=mask, starts=starts)


def read_run_config(path: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """A run folder's config.json and its model config, without touching the weights."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path} is not a run folder (no config.json): give the folder `tlm train --out` wrote")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"run config {config_path} is corrupt ({e})") from e
    if isinstance(config, dict) and "model" not in config and "model_type" in config:  # not "corrupt": another format
        raise CheckpointError(f"{path} is a Hugging Face model folder, not a run folder; import it first: "
                              f"tlm convert {path} --out RUN (Python: transformer_lm.interop.hf.import_hf)")
    try:
        return config, ModelConfig.from_dict(config["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"run config {config_path} is corrupt ({e})") from e


def load_run(path: str | Path, device: str = "auto") -> Run:
    """Load the latest checkpoint of a run folder written by `tlm train` (weights never execute code: safetensors).
    A sharded checkpoint (FSDP2) that was not consolidated is read whole from its shards, in memory."""
    path = Path(path)
    config, model_config = read_run_config(path)
    folder = latest_checkpoint(path)
    if folder is None:
        raise CheckpointError(f"{path} has no checkpoint yet; train it first (or wait for its first evaluation)")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    if tokenizer.vocab_size > model_config.vocab_size:  # a smaller tokenizer is normal (a padded embedding table)
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{model_config.vocab_size} embeddings; the run folder mixes two runs' files")
    with torch.device("meta"):
        model = build_model(model_config)
    load_weights(model, folder)
    model = model.to(resolve_device(device)).eval()
    return Run(path, config, model, tokenizer, checkpoint_step(folder), chat_template=read_chat_template(path))


def consolidate(path: str | Path) -> Path:
    """Write the whole weights of a run's latest checkpoint as model.safetensors beside its shards: the single-file
    format of every other checkpoint, for `tlm export`, for tools outside this package, and for loading without
    reassembling shards each time. One process, no process group: the shards of any world size are read whole.
    Returns the weights file. One that is there already is read through first: whole, it is left as it is; damaged,
    it is written again from the shards (or, with no shards to rebuild it from, the damage is the error)."""
    path = Path(path)
    _, model_config = read_run_config(path)
    folder = latest_checkpoint(path)
    if folder is None:
        raise CheckpointError(f"{path} has no checkpoint yet; train it first (or wait for its first evaluation)")
    weights = folder / "model.safetensors"
    with torch.device("meta"):
        model = build_model(model_config)
    if weights.exists():
        try:
            load_weights(model, folder)
            return weights
        except CheckpointError:
            if not is_sharded(folder):
                raise
            weights.unlink()  # a derived copy of the shards: rebuilt below
    load_weights(model, folder)
    return write_weights(folder, model, checkpoint_step(folder))


def seeded_generator(seed: int | None, model: Transformer) -> torch.Generator:
    """A generator on the model's device: seeded with `seed`, or from the system's entropy when None."""
    gen = torch.Generator(device=model.tok_emb.weight.device)
    gen.manual_seed(seed) if seed is not None else gen.seed()
    return gen
