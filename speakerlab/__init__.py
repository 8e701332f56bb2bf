"""speakerlab: speaker-verification training and evaluation toolkit."""

__version__ = "0.1.0"
