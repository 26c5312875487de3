"""Triton kernels for per-token log-probs; each op in its own file, launch settings in `config.py`."""
