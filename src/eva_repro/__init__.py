"""eva-repro: a BLIP3-o style DiT trained with rectified flow on EVA-CLIP patch embeddings."""

__version__ = "0.1.0"
