"""Interop with Hugging Face / PyTorch: the name and layout mapping (hf.py), export (export.py) and
import (hf_import.py)."""
