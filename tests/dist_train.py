"""Started by torchrun from test_distributed.py, once per rank: `train()` with model and train fields given as JSON,
paused after `stop_at` steps when given (as Ctrl-C would) — a pause the `tlm` command cannot ask for."""

from __future__ import annotations

import json
import sys

from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.data import load_prepared
from transformer_lm.parallel import leave
from transformer_lm.train import train

if __name__ == "__main__":
    data, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    res = train(ModelConfig(**spec["model"]), TrainConfig(**spec["train"]), load_prepared(data), out,
                resume=spec.get("resume", False), progress=False, stop_at=spec.get("stop_at"))
    print(f"rank done at step {res.step}")
    leave(0)  # as `tlm train` ends a worker: without the interpreter's finalization (see parallel.leave)
