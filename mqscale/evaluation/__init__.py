"""Metrics for generators (FID, IS) and tokenizers (PSNR, SSIM, LPIPS, rFID, codebook usage)."""
