"""The `tlm` commands that move models across formats: `tlm convert` (a Hugging Face folder or Hub id, a llama2.c
checkpoint, or a PEFT adapter merged onto a run) and `tlm export` (a run, or a LoRA fine-tune's adapters, for
Hugging Face)."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from .errors import ConfigError


def add_interop_parsers(cmds: dict[str, ArgumentParser]) -> None:
    p = cmds["convert"] = ArgumentParser(exit_on_error=False, description="Import a model into a run folder: a "
                                         "Hugging Face folder (gpt2, llama, mistral, qwen2) or a llama2.c .bin file; "
                                         "or merge a PEFT LoRA adapter onto a run (--base).")
    p.add_argument("src", type=str, help="Hugging Face model folder (config.json, safetensors, tokenizer.json), a "
                   "Hugging Face Hub model id (ORG/NAME: downloaded, with pip install huggingface_hub), or a "
                   "llama2.c .bin checkpoint.")
    p.add_argument("--out", type=str, required=True, help="Run folder to write.")
    p.add_argument("--dtype", type=str | None, default=None,
                   help="Cast Hugging Face weights to float32, bfloat16 or float16 (default: keep their dtype).")
    p.add_argument("--tokenizer", type=str | None, default=None,
                   help="llama2.c only: tokenizer.bin or tokenizer.model (default: the one beside the .bin).")
    p.add_argument("--base", type=str | None, default=None, help="SRC is a PEFT LoRA adapter (a folder or Hub id): "
                   "the run of the model it adapts, which --out gets with the adapter merged into its weights.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace a run tlm wrote in --out.")

    p = cmds["export"] = ArgumentParser(exit_on_error=False, description="Export a run's latest checkpoint as a "
                                        "Hugging Face folder that transformers' from_pretrained loads.")
    p.add_argument("run", type=str, help="Run folder.")
    p.add_argument("--out", type=str, required=True, help="Folder to write.")
    p.add_argument("--family", type=str | None, default=None,
                   help="gpt2, llama, mistral or qwen2 (default: the one the architecture matches).")
    p.add_argument("--dtype", type=str | None, default=None,
                   help="float32, bfloat16 or float16 (default: the checkpoint's dtype).")
    p.add_argument("--adapters", type=bool, default=False, help="A LoRA fine-tune (train.lora_rank): write only its "
                   "adapters, as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for the "
                   "export of its base run.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace an export of ours in --out.")


def cmd_convert(a: Namespace) -> None:
    from .interop.peft import import_adapters, is_adapter_folder

    if a.base is not None:
        out = import_adapters(a.src, a.base, a.out, a.overwrite)
        print(f"{out}: {a.base} with the LoRA adapter {a.src} merged; try `tlm sample {out}`")
        return
    if is_adapter_folder(a.src):
        raise ConfigError(f"{a.src} is a PEFT adapter, not a model: give the run of the model it adapts, --base RUN "
                          "(tlm convert that model first)")
    if Path(a.src).is_file() and a.src.endswith(".bin"):
        from .interop.llama2c import import_llama2c

        out = import_llama2c(a.src, a.out, a.tokenizer, overwrite=a.overwrite)
    else:
        from .interop.hf import import_hf

        out = import_hf(a.src, a.out, a.dtype, a.overwrite)
    from .chat import read_chat_template

    chat = read_chat_template(out) is not None
    print(f"{out}: imported {a.src}" + (f" with its chat template; try `tlm chat {out}`" if chat else
                                        f"; try `tlm sample {out}`"))


def cmd_export(a: Namespace) -> None:
    from .interop.hf import export_hf
    from .interop.peft import export_adapters

    if a.adapters:
        out = export_adapters(a.run, a.out, a.family, a.overwrite)
        print(f"{out}: the LoRA adapters of {a.run} for peft's PeftModel.from_pretrained, on the export of its base")
        return
    out = export_hf(a.run, a.out, a.family, a.dtype, a.overwrite)
    print(f"{out}: exported {a.run} for transformers' from_pretrained")
