"""The Stackformer: its arguments, the model, its layers, parameter and FLOP counts, and Algorithm 1."""
from mqscale.models.stackformer.args import ModelConfig
from mqscale.models.stackformer.counting import param_count, train_flops_per_token
from mqscale.models.stackformer.model import Stackformer, StackformerOutput
from mqscale.models.stackformer.sampling import SamplingParams, sample

__all__ = ["ModelConfig", "Stackformer", "StackformerOutput", "param_count", "train_flops_per_token",
           "SamplingParams", "sample"]
