"""Training the MQ-VAE tokenizer (``python -m mqscale.train_tokenizer``): its config, the GAN
training loop and losses, and pictures of what its masks keep (``mqscale.visualize_masks``)."""
