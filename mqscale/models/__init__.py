"""Pure-torch models: the Stackformer, the MQ-VAE, and the two fixed networks of the losses and
metrics (LPIPS, the FID Inception). Nothing here imports DeepSpeed, Ray or torch's distributed
package: parallelism wraps models, never the reverse. Each model keeps its arguments beside it."""
