"""Stackformer training: the one loop (``trainer.py``, no Ray), its DeepSpeed engine, optimizer
recipe, metrics and fault hooks; the Ray and deepspeed-launcher entries; export, the scale plan
and checkpoint verification (``python -m mqscale.train``, ``mqscale.export``, ``mqscale.plan``,
``mqscale.checkpoint verify``)."""
