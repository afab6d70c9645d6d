"""Hydra configs shipped with the package (`python -m ollm_triton.run` and the `ollm-triton` script compose them as
`pkg://ollm_triton.conf`, which needs this file to be importable)."""
