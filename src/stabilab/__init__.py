"""stabilab: a pipeline to replicate LLM pre-training stability research side by side."""

__version__ = "0.2.0"
