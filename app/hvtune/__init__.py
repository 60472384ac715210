"""hvtune: reproducible LoRA training for HunyuanVideo 1.5."""

__version__ = "0.1.0"
