"""Stable Diffusion parts: loading from a hub id or a local folder, the sampling pipeline and seeded generation, the tokenizer, the hub."""
