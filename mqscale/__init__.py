"""mqscale: distributed training of MQ-VAE + Stackformer. One package per pipeline stage (tokenizer,
tokenize, train, generate, evaluate), over shared scaffolding (core), data and models."""
