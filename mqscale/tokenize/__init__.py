"""Pre-tokenization (``python -m mqscale.tokenize``): image shards encoded once by a frozen MQ-VAE
into token shards, one shard per job, on a pool of Ray actors or in this process."""
