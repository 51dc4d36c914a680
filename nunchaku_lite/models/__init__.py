"""FLUX components in plain PyTorch: the DiT, the T5 and CLIP text encoders, the autoencoder."""
