"""dst: distributed block storage over NBD."""

__version__ = "0.1.0"
