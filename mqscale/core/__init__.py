"""Scaffolding every stage shares, written once: errors, the config loader, secrets redaction,
storage (fsspec, checksums, atomic writes), the exported-model format, checkpoints with their
verified marker and the sessions that commit them (Ray, the deepspeed launcher, one process), Ray,
TensorBoard, collectives, images, console and command-line plumbing. Nothing here imports a stage."""
