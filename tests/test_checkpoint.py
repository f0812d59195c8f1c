"""Checkpoint writes that the operating system refuses: the error names the file and the previous checkpoint stands."""

from __future__ import annotations

import errno
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from transformer_lm import checkpoint as ckpt
from transformer_lm.config import ModelConfig
from transformer_lm.model import Transformer

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes in any file fail with EFBIG, as a full disk fails them with ENOSPC: a real failed
    write(2) (safetensors writes from Rust, torch from C++), which no monkeypatch of Python's open() would reach."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the signal would kill the process instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("part", ["model.safetensors", "state.pt"])
def test_a_refused_write_is_an_os_error_naming_the_file(tmp_path: Path, part: str) -> None:
    """A full disk mid-save ended `tlm train` in a SafetensorError or RuntimeError traceback ('unexpected pos …'),
    not the CLI's one-line error for paths the system refuses, and left the partial checkpoint taking the space."""
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    ckpt.save_checkpoint(tmp_path, model, {"step": 1}, 1)
    weights = (tmp_path / "checkpoints" / "step-0000001" / "model.safetensors").stat().st_size
    # the weights fit and the state does not, or the weights do not
    big_state = {"step": 2, "optimizer": torch.zeros(weights // 4 + 1000)}
    limit = weights + 100 if part == "state.pt" else weights // 2
    with file_size_limit(limit), pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path, model, big_state, 2)
    assert info.value.errno == errno.EFBIG and Path(info.value.filename).name == part
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    ckpt.save_checkpoint(tmp_path, model, big_state, 2)
    assert torch.equal(ckpt.load_state(ckpt.latest_checkpoint(tmp_path))["optimizer"], big_state["optimizer"])



def test_refused_atomic_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    """The weights `tlm consolidate` writes, and the small JSON files (config, pointer): a full disk left the hidden
    temporary file behind, as large as what was written of it."""
    model = Transformer(ModelConfig(**SMALL)).init_weights(0)
    (tmp_path / "config.json").write_text("{}")
    with file_size_limit(1000):
        with pytest.raises(OSError) as info:
            ckpt.write_weights(tmp_path, model, 1)
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError):
            ckpt.atomic_write_text(tmp_path / "config.json", "x" * 5000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "{}"


class _Payload:
    """Pickles as a call of open(marker, "w"): loading it with pickle would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def test_a_state_file_that_would_run_code_is_refused_in_one_short_line(tmp_path: Path) -> None:
    """torch's weights_only refusal reached the CLI whole: a page of text advising weights_only=False and
    add_safe_globals (with terminal escape codes), where the point is that tlm never writes such a file."""
    folder = tmp_path / "step"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "rng": _Payload(marker)}, folder / "state.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"names the Python object [\w.]*open.*intact copy") as info:
        ckpt.load_state(folder)
    assert not marker.exists()
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 300
    good = folder / "state.pt"
    torch.save({"step": 1}, good)
    good.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"truncated or corrupt \(RuntimeError: PytorchStreamReader") as info:
        ckpt.load_state(folder)
    assert len(str(info.value)) < 300
