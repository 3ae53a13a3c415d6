"""Sampling: load a diffusion run, generate, write a sample directory (files + manifest + grid)."""

from medgen.sample.pipeline import DiffusionPipeline, load_pipeline, write_samples

__all__ = ["DiffusionPipeline", "load_pipeline", "write_samples"]
