"""Pure-torch models. Nothing in this package imports deepspeed, ray or torch.distributed."""
from mqscale.models.counting import param_count, train_flops_per_token
from mqscale.models.stackformer import Stackformer, StackformerOutput

__all__ = ["Stackformer", "StackformerOutput", "param_count", "train_flops_per_token"]
