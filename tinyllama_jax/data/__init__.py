"""Data: corpora -> sentencepiece tokens -> grain packing -> per-process numpy batches.

Importing this package loads nothing heavy; grain and sentencepiece are imported by the modules
that use them. The data package never imports the model.
"""
