"""mesh-inference: pool several machines into one llama.cpp inference service."""

__version__ = "0.1.0"
