"""Images from an exported Stackformer and its tokenizer (``python -m mqscale.sample``): the image
generator, sampling settings and flags, prompts; Algorithm 1 itself is the model's
(``models/stackformer/sampling.py``)."""
