"""Import llama2.c checkpoints (https://github.com/karpathy/llama2.c) into a run folder.

Formats (float32, little-endian, tensors stored as PyTorch `nn.Linear` weights, i.e. (out, in)):

- legacy (v0): a 7×int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
  vocab_size means an untied classifier), then token embedding, attention norms, wq, wk, wv, wo, FFN norms, w1, w2,
  w3, final norm, the RoPE cos/sin tables (unused: run.c recomputes them) and [classifier];
- version 1: uint32 magic "ak42", int32 version 1, the same 7 ints, a shared-classifier byte, zeros up to 256 bytes,
  then attention norms, FFN norms, final norm, token embedding, wq, wk, wv, wo, w1, w2, w3, [classifier].

The model is a Llama 2: RMSNorm (eps 1e-5), RoPE (theta 10000), SwiGLU with w1 = gate, w3 = up, w2 = down, grouped-
query attention. llama2.c rotates adjacent pairs (2i, 2i+1) while our `apply_rope` rotates (i, i + d/2), so the rows
of wq and wk are permuted per head on import (`rope_pairs_to_halves`).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import check_out, save_checkpoint, staged_dir
from ..config import ModelConfig, dump_json
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..llama_tokenizers import Llama2cTokenizer, SentencePieceTokenizer
from ..model import Transformer
from ..tokenizers import Tokenizer, save_tokenizer

log = logging.getLogger(__name__)

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
V1_HEADER_BYTES = 256


@dataclass(frozen=True)
class Llama2cHeader:
    """What a llama2.c .bin header says; `offset` is where the float32 tensors start."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    offset: int

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(llama2.c name, shape) of every stored tensor, in file order; per-layer tensors are stacked (L, ...)."""
        L, d, h, v = self.n_layers, self.dim, self.hidden_dim, self.vocab_size
        kv = self.n_kv_heads * self.head_size
        attn = [("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d))]
        ffn = [("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d))]
        if self.version == 0:
            half = self.head_size // 2
            shapes = [("token_embedding", (v, d)), ("rms_att", (L, d)), *attn, ("rms_ffn", (L, d)), *ffn,
                      ("rms_final", (d,)), ("freq_cis_real", (self.seq_len, half)),
                      ("freq_cis_imag", (self.seq_len, half))]
        else:
            shapes = [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,)), ("token_embedding", (v, d)),
                      *attn, *ffn]
        if not self.shared_classifier:
            shapes.append(("wcls", (v, d)))
        return shapes

    def file_size(self) -> int:
        return self.offset + 4 * sum(int(np.prod(s)) for _, s in self.tensor_shapes())

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, block_size=self.seq_len, n_layer=self.n_layers, n_head=self.n_heads,
            n_embd=self.dim, n_kv_head=self.n_kv_heads, d_ff=self.hidden_dim, pos_encoding="rope",
            rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", bias=False,
            tie_embeddings=self.shared_classifier,
        )


def read_header(path: str | Path) -> Llama2cHeader:
    """Parse and check a llama2.c header (legacy or version 1) against the file's size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(V1_HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read llama2.c checkpoint {path} ({e})") from None
    if len(head) < 28:
        raise CheckpointError(f"{path} is {len(head)} bytes, too short for a llama2.c header")
    if struct.unpack_from("<I", head)[0] == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise CheckpointError(f"{path} has the llama2.c magic but is shorter than its 256-byte header")
        version, *params = struct.unpack_from("<8i", head, 4)
        if version != 1:
            raise CheckpointError(f"{path} is llama2.c format version {version}; only the legacy format and "
                                  "version 1 (float32) are supported (re-export with `export.py --version 1`)")
        shared, offset = bool(head[36]), V1_HEADER_BYTES
    else:
        version, params, offset = 0, list(struct.unpack_from("<7i", head)), 28
        shared, params[5] = params[5] > 0, abs(params[5])
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = params
    if min(params) < 1 or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise CheckpointError(
            f"{path} is not a llama2.c checkpoint: its header (dim={dim}, hidden_dim={hidden_dim}, "
            f"n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv_heads}, vocab_size={vocab_size}, "
            f"seq_len={seq_len}) is inconsistent")
    header = Llama2cHeader(version, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared,
                           offset)
    if size != header.file_size():
        raise CheckpointError(
            f"{path} is {size} bytes but its llama2.c v{version} header (dim={dim}, n_layers={n_layers}, "
            f"vocab_size={vocab_size}, seq_len={seq_len}, shared_classifier={shared}) needs {header.file_size()}; "
            "the file is truncated or not a float32 llama2.c checkpoint")
    return header


def rope_pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q/k projection (n_heads*hd, in) from llama2.c's adjacent-pair RoPE layout to the rotate-
    half layout: within each head, row i <- 2i and row i + hd/2 <- 2i + 1."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (nh, 2, hd/2, in) flattened


def read_llama2c(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Llama2cHeader]:
    """The model config and our state dict (tied head stored once, under tok_emb.weight) of a llama2.c .bin."""
    header = read_header(path)
    flat = np.memmap(path, dtype="<f4", mode="r", offset=header.offset)  # each tensor is copied out once
    tensors, pos = {}, 0
    for name, shape in header.tensor_shapes():
        n = int(np.prod(shape))
        tensors[name] = torch.from_numpy(flat[pos:pos + n].astype(np.float32).reshape(shape))
        pos += n
    config = header.model_config()
    sd = {"tok_emb.weight": tensors["token_embedding"], "norm.weight": tensors["rms_final"]}
    for i in range(header.n_layers):
        p = f"blocks.{i}."
        q = rope_pairs_to_halves(tensors["wq"][i], header.n_heads)
        k = rope_pairs_to_halves(tensors["wk"][i], header.n_kv_heads)
        sd[p + "attn.qkv.weight"] = torch.cat([q, k, tensors["wv"][i]], dim=0)  # rows [Q; K; V]
        sd[p + "attn.proj.weight"] = tensors["wo"][i]
        sd[p + "norm1.weight"] = tensors["rms_att"][i]
        sd[p + "norm2.weight"] = tensors["rms_ffn"][i]
        sd[p + "ffn.gate.weight"] = tensors["w1"][i]
        sd[p + "ffn.up.weight"] = tensors["w3"][i]
        sd[p + "ffn.down.weight"] = tensors["w2"][i]
    if not header.shared_classifier:
        sd["lm_head.weight"] = tensors["wcls"]
    return config, {k: v.contiguous() for k, v in sd.items()}, header


def load_llama2c(path: str | Path) -> Transformer:
    """A llama2.c .bin as a ready (eval-mode, float32, CPU) model."""
    config, sd, _ = read_llama2c(path)
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings:
        sd = {**sd, "lm_head.weight": sd["tok_emb.weight"]}
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def load_llama2c_tokenizer(path: str | Path) -> Tokenizer:
    """llama2.c's tokenizer.bin, or a SentencePiece tokenizer.model (told apart by content, not by name)."""
    try:
        return Llama2cTokenizer.from_bin(path)
    except TokenizerError as bin_error:
        try:
            return SentencePieceTokenizer.from_file(path)
        except TokenizerError as sp_error:
            raise TokenizerError(f"{path} is neither a llama2.c tokenizer.bin ({bin_error}) nor a SentencePiece "
                                 f"model ({sp_error})") from None


def _find_tokenizer(bin_path: Path) -> Path:
    for name in ("tokenizer.bin", "tokenizer.model"):
        if (bin_path.parent / name).is_file():
            return bin_path.parent / name
    raise TokenizerError(f"no tokenizer given and no tokenizer.bin or tokenizer.model beside {bin_path}; pass the "
                         "model's tokenizer (llama2.c's tokenizer.bin or a SentencePiece tokenizer.model)")


def import_llama2c(bin_path: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """Convert a llama2.c checkpoint and its tokenizer into a run folder that `load_run` reads; returns the folder.

    `tokenizer_path` is llama2.c's tokenizer.bin or a SentencePiece tokenizer.model; by default a tokenizer.bin
    or tokenizer.model beside the checkpoint. The run's config.json records where the weights came from.
    """
    bin_path, out_dir = Path(bin_path), Path(out_dir)
    header = read_header(bin_path)  # first: a file that is no llama2.c checkpoint is named as such, not its tokenizer
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else _find_tokenizer(bin_path)
    check_out(out_dir, overwrite, [bin_path, tok_path])
    try:
        model = load_llama2c(bin_path)
    except ConfigError as e:
        raise CheckpointError(f"{bin_path}: {e}") from None
    tokenizer = load_llama2c_tokenizer(tok_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but {bin_path} has "
                              f"vocab_size {model.config.vocab_size}; pass the tokenizer the model was trained with")
    config = {
        "model": model.config.to_dict(),
        "source": {"format": "llama2c", "version": header.version, "weights": str(bin_path.resolve()),
                   "tokenizer": str(tok_path.resolve()), "tokenizer_kind": tokenizer.kind},
    }
    with staged_dir(out_dir, overwrite) as tmp:
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        save_checkpoint(tmp, model, state={}, step=0)
        (tmp / "config.json").write_text(dump_json(config))
    log.info("imported %s (llama2.c v%d) into %s", bin_path, header.version, out_dir)
    return out_dir
