"""Data: tokenizers, corpus reading, preprocessing to megatron-core ``.bin/.idx``, embedded corpora."""
