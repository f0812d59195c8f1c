"""The Transformer's claims as experiments (issue 6): each module is a library of typed functions that raise
`transformer_lm.errors` exceptions and never print; the `tlm` CLI formats and prints their results.

- `planner`: training compute (6·N·D plus attention), Chinchilla-optimal size, time, energy and memory on named
  accelerators (`tlm plan`).
- `attention`: per-layer, per-head attention maps and per-token surprisal of a text under a trained run
  (`tlm attention`).
"""
