# Hand-written (not generated): the package entry point. Every other module in this folder is
# exported from a notebook in notebooks/ by tools/export.py; edit the notebook, not the module.
"""Strawberry: a notebook-first course that builds an experimental small language model."""

__version__ = "0.1.0"
