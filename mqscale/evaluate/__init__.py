"""Evaluation (``python -m mqscale.evaluate``): FID and IS of a generator, reconstruction metrics of
a tokenizer (PSNR, SSIM, LPIPS, rFID, codebook use), and the mask-ratio sweep."""
