"""The Transformer's claims as experiments (issue 6): each module is a library of typed functions that raise
`transformer_lm.errors` exceptions and never print; the `tlm` CLI formats and prints their results.

- `planner`: training compute (6·N·D plus attention), Chinchilla-optimal size, time, energy and memory on named
  accelerators (`tlm plan`).
- `memory`: training memory per device from the config alone: weights, gradients, optimizer state and activations
  under DDP or FSDP2, with or without activation checkpointing (`tlm memory`).
- `attention`: per-layer, per-head attention maps and per-token surprisal of a text under a trained run
  (`tlm attention`).
- `scaling`: a ladder of model sizes trained by the real trainer, L(N) and L(C) power-law fits
  (`tlm experiment scaling`).
- `synthetic_pe`: sequence reversal learned with each positional encoding and none (`tlm experiment pe-ablation`).
- `report`: one offline HTML page over runs and experiment folders (`tlm report`).
- `speed`: training tokens/s and forward latency of a Transformer, an LSTM and an RNN of matched size against sequence
  length (`tlm experiment speed`).
- `synthetic` and `long_range`: associative recall and copy with answers a controlled distance back; a Transformer and
  an LSTM of matched size trained on them and scored by distance (`tlm experiment long-range`).
- `plotting`: matplotlib figures on the Agg canvas, shared by the experiments.
"""
