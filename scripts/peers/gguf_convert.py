#!/usr/bin/env python3
"""Convert a `harness synth --layout bf16` checkpoint to GGUF with llama.cpp's own converter.

Usage: python3 scripts/peers/gguf_convert.py LLAMA_CPP_DIR CHECKPOINT_DIR OUT.gguf [CONVERTER ARGS...]
(e.g. `--no-mtp` for a GLM-4.7-Flash checkpoint without its MTP layer's tensors)

llama.cpp's `convert_hf_to_gguf.py` does the whole conversion (tensor names, shapes, hyper-parameters)
unchanged, except its vocabulary step: for GLM it wants GLM's own tokenizer (special tokens), and a synth
checkpoint ships a byte-level tokenizer. `llama-bench` never tokenizes text, so the vocabulary step is
replaced by a plain GPT-2-style vocabulary of `vocab_size` placeholder tokens; everything that affects speed
(every weight, the architecture keys) is the converter's own.
"""
import runpy
import sys
from pathlib import Path

llama, model, out, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, str(llama))
sys.path.insert(1, str(llama / "gguf-py"))

import conversion.glm as glm  # noqa: E402  (llama.cpp's own model classes)


def placeholder_vocab(self):
    n = int(self.hparams["vocab_size"])
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([f"<t{i}>" for i in range(n)])
    self.gguf_writer.add_token_types([1] * n)  # NORMAL
    self.gguf_writer.add_token_merges(["< t"])
    self.gguf_writer.add_bos_token_id(0)
    self.gguf_writer.add_eos_token_id(1)


glm.Glm4MoeModel.set_vocab = placeholder_vocab
glm.Glm4MoeLiteModel.set_vocab = placeholder_vocab  # GLM-4.7-Flash (llama.cpp's deepseek2 arch)
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", "bf16", *extra]
runpy.run_path(str(llama / "convert_hf_to_gguf.py"), run_name="__main__")
