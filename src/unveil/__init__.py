"""unveil: train medical vision-language models to find, localise and explain abnormalities."""

__version__ = "0.1.0"
