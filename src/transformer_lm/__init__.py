"""transformer-lm: build, train, sample and evaluate Transformer language models in plain PyTorch.

The Python API mirrors the `tlm` command: `prepare`, `train`, `load_run` (then `Run.generate` / `Run.evaluate`),
and `count_params` / `flops_per_token` for what `tlm info` shows.
"""

from .accounting import count_params, flops_per_token, training_memory
from .api import Run, load_run
from .config import ModelConfig, SampleConfig, TrainConfig
from .data import load_prepared, prepare
from .errors import CheckpointError, ConfigError, DataError, DivergenceError, RunExistsError, TLMError, TokenizerError
from .model import KVCache, Transformer
from .tokenizers import build_tokenizer, load_tokenizer
from .train import train
from .train_data import training_data

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DivergenceError", "KVCache", "ModelConfig", "Run", "RunExistsError",
    "SampleConfig", "TLMError", "TokenizerError", "TrainConfig", "Transformer", "build_tokenizer", "count_params",
    "flops_per_token", "load_prepared", "load_run", "load_tokenizer", "prepare", "train", "training_data",
    "training_memory",
]
