"""The quality judge (``python -m mqscale.judge``): a classifier of the dataset's own classes,
trained on its labelled image shards before anything else, that later stages use as a measure
needing no downloads: conditional accuracy and FD_judge of generated images (during training and
in ``mqscale.evaluate``), and the accuracy of the tokenizer's reconstructions."""
