"""Conversion to and from other formats, one module per format: `hf` (Hugging Face transformers folders), `llama2c`
(llama2.c `.bin` checkpoints). Each imports into a run folder that `load_run`, `tlm sample` and `tlm eval` read."""
