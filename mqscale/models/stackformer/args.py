"""The Stackformer's arguments: the ``model`` section of a Stackformer run config.

Defaults are the debug size; the named configs (configs/stackformer/*.yaml) scale it. ``check``
refuses combinations the model cannot build (heads not dividing the width, a sequence longer
than the grid or the block), each as one line naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mqscale.core.config import setting


@dataclass
class ModelConfig:
    """Stackformer. Defaults are the debug size; named configs scale it."""
    arch: Literal["stackformer"] = "stackformer"
    order: Literal["code_first", "pos_first"] = setting(
        "code_first", doc="code_first is the paper's Stackformer; pos_first is Stackformer_r")
    n_code_layer: int = setting(2, ge=1, doc="blocks in the Code-Transformer")
    n_pos_layer: int = setting(2, ge=1, doc="blocks in the Position-Transformer")
    n_embd: int = setting(128, ge=8, doc="width")
    n_head: int = setting(4, ge=1, doc="attention heads (must divide n_embd)")
    dropout: float = setting(0.0, ge=0.0, lt=1.0, doc="embedding, attention and residual dropout")
    codebook_size: int = setting(1024, ge=2, doc="K: number of codes")
    grid: int = setting(32, ge=1, doc="side of the token grid; G = grid*grid positions")
    seq_len: int = setting(64, ge=1, doc="L: kept codes per image (mask ratio * G)")
    block_size: int = setting(0, ge=0, doc="max Code-Transformer length; 0 = prefix + L - 1")
    cond: Literal["none", "class", "text"] = setting("class", doc="conditioning kind")
    n_classes: int = setting(1000, ge=1, doc="classes, when cond=class")
    text_vocab_size: int = setting(258, ge=2, doc="text token ids, when cond=text")
    text_len: int = setting(32, ge=1, doc="T: text prefix length, when cond=text")
    abs_pos: bool = setting(True, doc="learned absolute sequence-index embedding")
    pos_loss_weight: float = setting(1.0, ge=0.0, doc="lambda in loss = code CE + lambda * position CE")
    activation_checkpointing: bool = setting(False, doc="recompute every block in backward")
    checkpoint_blocks: list[int] = setting([], doc="recompute only these blocks (code blocks 0.., then "
                                      "position blocks); overrides activation_checkpointing")
    init_std: float = setting(0.02, gt=0.0, doc="std of the normal init of weights")
    compile: Literal[False, True, "auto"] = setting(
        False, doc="torch.compile the training step inside the DeepSpeed engine (static shapes); auto: "
        "eager where inductor cannot compile")

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid

    @property
    def prefix_len(self) -> int:
        return self.text_len if self.cond == "text" else 1

    @property
    def resolved_block_size(self) -> int:
        return self.block_size or (self.prefix_len + self.seq_len - 1)

    def check(self, err) -> None:
        if self.n_embd % self.n_head:
            err("model.n_head", f"{self.n_head} does not divide model.n_embd={self.n_embd}")
        if self.seq_len > self.n_positions:
            err("model.seq_len", f"{self.seq_len} is over the grid's {self.grid}x{self.grid}="
                f"{self.n_positions} positions")
        n_blocks = self.n_code_layer + self.n_pos_layer
        for i, b in enumerate(self.checkpoint_blocks):
            if not 0 <= b < n_blocks:
                err(f"model.checkpoint_blocks[{i}]", f"{b} is not a block index (0..{n_blocks - 1})")
        need = self.prefix_len + self.seq_len - 1
        if self.block_size and need > self.block_size:
            err("model.seq_len", f"prefix {self.prefix_len} + seq_len {self.seq_len} - 1 = {need} "
                f"is over model.block_size={self.block_size}")
