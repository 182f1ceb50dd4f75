"""pipeline: run an LLM split by layers across MPI ranks (MLX, mlx-lm)."""

__version__ = "0.1.0"
