"""The memory planner against PyTorch's own memory tracker (torch.distributed._tools), which follows every tensor of a
real training step on CPU: one process (DDP's per-device memory) and FSDP2 on a fake 4-rank process group (each rank's
shards, exactly as on 4 devices, without their communication)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from transformer_lm.cli import main
from transformer_lm.config import ModelConfig, TrainConfig
from transformer_lm.experiments.memory import MemoryPlan, plan_memory
from transformer_lm.model import Transformer
from transformer_lm.parallel import DistInfo, parallelize

CONFIGS = {
    "gpt2": ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=64),
    "llama": ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64,
                         pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}
TOLERANCE = {False: 0.05, True: 0.15}
"""Peak within 5% without activation checkpointing, 15% with it (the planner counts a whole rebuilt block)."""


def measure(tracker_cls, model: Transformer, forward, optimizer, x: torch.Tensor, **kw) -> dict[str, int]:
    """The tracker's per-category bytes at the peak of the second of two training steps (the first allocates the
    optimizer state)."""
    tracker = tracker_cls(model, optimizer) if kw.get("fsdp") else tracker_cls()
    if not kw.get("fsdp"):
        tracker.track_external(model, optimizer)
    with tracker:
        for i in range(2):
            forward(x, x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i == 0:
                tracker.reset_mod_stats()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(k).rsplit(".", 1)[-1]: v for k, v in peak.items()}


def report(name: str, plan: MemoryPlan, got: dict[str, int]) -> float:
    ratio = plan.peak / got["Total"]
    print(f"{name}: planned peak {plan.peak:,} B, measured {got['Total']:,} B (x{ratio:.3f}); measured {got}")
    return ratio


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_device(name: str, checkpointing: bool):
    from torch.distributed._tools.mem_tracker import MemTracker

    config, b = CONFIGS[name], 4
    model = Transformer(config).init_weights(0)
    forward = parallelize(model, DistInfo(), TrainConfig(activation_checkpointing=checkpointing, device="cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)  # as on CPU: the foreach step
    got = measure(MemTracker, model, forward, optimizer, torch.randint(0, config.vocab_size, (b, config.block_size)))
    plan = plan_memory(config, b, world_size=1, dtype="float32", activation_checkpointing=checkpointing,
                       fused_optimizer=False)
    ratio = report(f"{name}{' +AC' if checkpointing else ''}", plan, got)
    assert plan.weights == got["PARAM"]  # exact: fp32 parameters
    assert abs(plan.optimizer - got["OPT"]) <= 4 * len(list(model.parameters()))  # + AdamW's scalar step counts
    if not checkpointing:  # at the peak (the end of the forward pass) every saved activation is alive
        assert abs((plan.activations + plan.logits_transient) / got["ACT"] - 1) < 0.01  # the loss's buffer included
        assert got["TEMP"] == 0  # the fused loss leaves no logits-sized tensor to the backward pass
    assert abs(ratio - 1) < TOLERANCE[checkpointing]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_one_device_under_autocast(dtype: str):
    """bf16 trains through the fused head + loss, float16 through the plain loss (model.head_loss): the plan follows."""
    from torch.distributed._tools.mem_tracker import MemTracker

    config, b = CONFIGS["gpt2"], 4
    model = Transformer(config).init_weights(0)

    def forward(x: torch.Tensor, y: torch.Tensor):
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            return model(x, y)

    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    got = measure(MemTracker, model, forward, optimizer, torch.randint(0, config.vocab_size, (b, config.block_size)))
    plan = plan_memory(config, b, world_size=1, dtype=dtype, fused_optimizer=False)
    ratio = report(f"gpt2 {dtype} autocast", plan, got)
    assert got["TEMP"] == plan.logits_in_backward  # the plain loss's two gradients, or nothing
    assert abs(ratio - 1) < TOLERANCE[False]


@pytest.fixture
def fake_group() -> Iterator[int]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 4
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield world
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_per_device(fake_group: int, checkpointing: bool):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    config, b, world = ModelConfig(**{**CONFIGS["llama"].to_dict(), "n_layer": 4}), 4, fake_group
    model = Transformer(config).init_weights(0)
    forward = parallelize(model, DistInfo(0, world, 0), TrainConfig(parallel="fsdp", device="cpu",
                                                                    activation_checkpointing=checkpointing))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    got = measure(FSDPMemTracker, model, forward, optimizer,
                  torch.randint(0, config.vocab_size, (b, config.block_size)), fsdp=True)
    plan = plan_memory(config, b, world_size=world, parallel="fsdp", dtype="float32",
                       activation_checkpointing=checkpointing, fused_optimizer=False)
    ratio = report(f"fsdp x{world}{' +AC' if checkpointing else ''}", plan, got)
    n = sum(p.numel() for p in Transformer(config).parameters())
    assert got["SHARDED_PARAM"] == 4 * n // world  # each rank holds a quarter of the fp32 parameters
    assert 8 * n // world <= got["OPT"] <= 8 * n // world + 4 * len(list(model.parameters()))
    assert abs(ratio - 1) < TOLERANCE[checkpointing]


def test_cli_prints_the_four_layouts(capsys: pytest.CaptureFixture):
    assert main(["memory", "--preset", "llama-2-7b", "--batch_size", "1", "--seq_len", "4096", "--world_size", "8",
                 "--gpu_gb", "80"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if "DDP+AC" in ln).split()
    assert header == ["DDP", "DDP+AC", "FSDP", "FSDP+AC"]
    fits = next(ln for ln in out.splitlines() if ln.startswith("fits 80 GB")).split()[3:]
    assert fits == ["no", "no", "yes", "yes"]  # 16 B/parameter of fp32 training state alone is 108 GB unsharded
    weights = next(ln for ln in out.splitlines() if ln.startswith("weights")).split()[-4:]
    # FSDP: a 1/8 fp32 shard (3.37 GB) + the bf16 all-gathered root (2 × 32000 × 4096 + 4096) and two blocks
    # (2 × 202,383,360 parameters): 1.33 GB
    assert [float(w) for w in weights] == pytest.approx([26.95, 26.95, 4.70, 4.70], abs=0.01)


def test_cli_shows_a_small_model_in_megabytes(capsys: pytest.CaptureFixture):
    """The default preset (tiny, 858,880 parameters) needs a few MB: in GB every row had printed 0.00 or 0.01."""
    assert main(["memory"]) == 0
    out = capsys.readouterr().out
    assert "MB per device (1 MB = 10⁶ bytes)" in out.splitlines()[0]
    row = {ln[:24].strip(): [float(v) for v in ln[24:].split()] for ln in out.splitlines()[2:-1]}
    n = 4 * (12 * 128**2 + 13 * 128) + 2 * 256 * 128 + 2 * 128  # 4 blocks, token and position tables, final norm
    assert row["weights (fp32)"][:2] == pytest.approx([4 * n / 1e6] * 2, abs=0.005)  # DDP: whole fp32 weights
    assert row["AdamW state"][:2] == pytest.approx([8 * n / 1e6] * 2, abs=0.005)


@pytest.mark.parametrize("flag,value,error", [("--batch_size", "0", "batch_size must be >= 1, got 0"),
                                              ("--world_size", "0", "world_size must be >= 1, got 0"),
                                              ("--seq_len", "999", "seq_len must be in [1, block_size=256], got 999")])
def test_cli_names_the_setting_that_is_out_of_range(capsys: pytest.CaptureFixture, flag: str, value: str, error: str):
    """One message had listed all three rules for any of them ("need batch_size >= 1, world_size >= 1 and ...")."""
    assert main(["memory", flag, value]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1
