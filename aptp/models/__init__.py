"""Model registry, the embedded toy model and shipped configs/weights."""
