"""Using a trained model: decoding with the KV cache (generate.py) and scoring text (evaluate.py)."""
