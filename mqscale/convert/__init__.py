"""Checkpoint conversion: official checkpoints in, safetensors exports out."""
