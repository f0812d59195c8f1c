"""Typed exceptions raised by the library.

The library never prints or exits; the CLI turns any `TLMError` into a one-line message and exit code 2.
Each message names the problem and, where there is one, the fix.
"""


class TLMError(Exception):
    """Base class of every error the library raises on bad input."""


class ConfigError(TLMError, ValueError):
    """An invalid model, training or generation configuration, or an unknown preset/tokenizer name."""


class DataError(TLMError):
    """Missing, empty, unreadable or too-short data."""


class TokenizerError(TLMError):
    """Text a tokenizer cannot encode, or a tokenizer file that cannot be read."""


class CheckpointError(TLMError):
    """A checkpoint that is missing, truncated, corrupt or incompatible with the requested config."""


class RunExistsError(TLMError):
    """The output folder already holds a different run."""


class ConversionError(TLMError):
    """A foreign model (Hugging Face, llama2.c, …) this tool cannot import, or a model a foreign format cannot
    represent on export; the message names the unsupported feature."""


class DivergenceError(TLMError):
    """The training loss or gradient norm became NaN or infinite: the run stops at that step, before a checkpoint of
    the weights it damaged could replace the last good one."""


class DistributedError(TLMError):
    """A multi-process run lost a rank: a collective failed because another process died, or timed out waiting for
    one that hangs. The process should end soon after (the CLI exits at once): freeing a gloo process group with a
    collective still queued to the lost peer can deadlock."""


class ChatError(TLMError, ValueError):
    """A chat template that does not compile, a run with none, or a conversation the template refuses (its own
    message says why: roles that do not alternate, say)."""
