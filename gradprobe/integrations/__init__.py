"""Adapters that run gradprobe inside other tool chains (each needs its own optional extra).

* :mod:`gradprobe.integrations.llmcompressor` — ``GradprobeModifier`` for llm-compressor recipes
  (``pip install "gradprobe[llmcompressor]"``, best in its own virtual environment).

Zero-shot accuracy with lm-evaluation-harness lives in :mod:`gradprobe.zeroshot`.
"""
