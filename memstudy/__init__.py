"""memstudy: do generative models copy their training images? A re-executable study."""

__version__ = "0.1.0"
