"""Interop with Hugging Face / PyTorch: the name and layout mapping (hf.py), export and import
(export.py)."""
