"""Checkpoints: the orbax manager a run saves and restores with (manager.py), and the reader of
a finished run that every command uses to find its step, config, tokenizer and params (run.py)."""
