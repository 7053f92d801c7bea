"""saesweep: sparse autoencoders and transcoders on language-model activations, swept."""

__version__ = "0.1.0"
