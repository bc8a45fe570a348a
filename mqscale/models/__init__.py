"""Pure-torch models. Nothing in this package imports DeepSpeed, Ray or torch's distributed package."""
from mqscale.models.counting import param_count, train_flops_per_token
from mqscale.models.stackformer import Stackformer, StackformerOutput

__all__ = ["Stackformer", "StackformerOutput", "param_count", "train_flops_per_token"]
