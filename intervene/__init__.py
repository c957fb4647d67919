"""intervene: exact, fast, safe inference-time interventions on HuggingFace transformers."""

__version__ = "0.1.0"
