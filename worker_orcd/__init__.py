"""worker-orcd: an inference worker for GGUF language models."""

__version__ = "0.1.0"
