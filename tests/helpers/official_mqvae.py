"""A from-scratch stand-in for the official MQ-VAE, for the conversion-equivalence tests.

It follows the official ``MaskedVectorQuantizationModel``'s parameter names and computation
(taming encoder/decoder with explicit attention, the refine masker sorting by score, the
de-masker filling cells one image at a time with an unused ``temb_proj`` in its ResNet blocks,
the RQ-VAE-style EMA codebook with a padding row), so its state dict looks like an official one.
Written for these tests; no official code is included.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gn(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def act(x):
    return x * torch.sigmoid(x)


class Res(nn.Module):
    def __init__(self, cin, cout=None, temb=0):
        super().__init__()
        cout = cout or cin
        self.norm1, self.conv1 = gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        if temb:
            self.temb_proj = nn.Linear(temb, cout)
        self.norm2, self.conv2 = gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(act(self.norm2(self.conv1(act(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x, mask=None):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(n).reshape(b, c, h * w)
        wts = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        if mask is not None:
            wts = wts * mask.unsqueeze(-2)
        out = torch.bmm(self.v(n).reshape(b, c, h * w), wts.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Enc(nn.Module):
    def __init__(self, ch, ch_mult, nrb, attn_res, res, zc, cin=3):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.down = nn.ModuleList()
        bi, r = ch, res
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nrb):
                lvl.block.append(Res(bi, ch * m))
                bi = ch * m
                if r in attn_res:
                    lvl.attn.append(Attn(bi))
            if i != len(ch_mult) - 1:
                lvl.downsample = nn.Module()
                lvl.downsample.conv = nn.Conv2d(bi, bi, 3, stride=2)
                r //= 2
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = Res(bi), Attn(bi), Res(bi)
        self.norm_out, self.conv_out = gn(bi), nn.Conv2d(bi, zc, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, b in enumerate(lvl.block):
                h = b(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(act(self.norm_out(h)))


class Dec(nn.Module):
    def __init__(self, ch, ch_mult, nrb, attn_res, res, cout=3):
        super().__init__()
        bi, r = ch * ch_mult[-1], res // 2 ** (len(ch_mult) - 1)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            lvl = nn.Module()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nrb + 1):
                lvl.block.append(Res(bi, ch * ch_mult[i]))
                bi = ch * ch_mult[i]
                if r in attn_res:
                    lvl.attn.append(Attn(bi))
            if i != 0:
                lvl.upsample = nn.Module()
                lvl.upsample.conv = nn.Conv2d(bi, bi, 3, padding=1)
                r *= 2
            self.up.insert(0, lvl)
        self.norm_out, self.conv_out = gn(bi), nn.Conv2d(bi, cout, 3, padding=1)

    def forward(self, h):
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for j, b in enumerate(lvl.block):
                h = b(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if i != 0:
                h = lvl.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(act(self.norm_out(h)))


class Masker(nn.Module):
    def __init__(self, ratio, n_tokens, dim, codebook_dim):
        super().__init__()
        self.k, self.hw = int(ratio * n_tokens), int(n_tokens ** 0.5)
        self.score_pred_net = nn.Sequential(
            nn.LayerNorm([dim, self.hw, self.hw], elementwise_affine=False), nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(), nn.Conv2d(dim, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.norm_feature = nn.LayerNorm(dim, elementwise_affine=False)
        self.pre_projection = nn.Linear(dim, codebook_dim, bias=False)

    def forward(self, feats):
        b, c, h, w = feats.shape
        score = self.score_pred_net(feats).view(b, -1)
        order = score.detach().sort(descending=True, dim=1).indices
        top = order[:, : self.k]
        tokens = self.norm_feature(feats.flatten(2).permute(0, 2, 1))
        sampled = tokens.gather(1, top[..., None].expand(-1, -1, c)) * score.gather(1, top).unsqueeze(-1)
        return self.pre_projection(sampled).permute(0, 2, 1), top


class Demasker(nn.Module):
    def __init__(self, codebook_dim, out_dim, hw, n_layer, mask_init):
        super().__init__()
        self.hw, self.mask_init = hw, mask_init
        self.mask_token = nn.Parameter(torch.empty(1, codebook_dim, 1).uniform_(-0.1, 0.1))
        self.post_projection = nn.Conv2d(codebook_dim, out_dim, 1)
        self.conv_in = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.transformer = nn.Module()
        self.transformer.blocks = nn.ModuleList()
        for _ in range(n_layer):
            blk = nn.Module()
            blk.attn, blk.resblock = Attn(out_dim), Res(out_dim, temb=512)
            self.transformer.blocks.append(blk)
        self.transformer.last_resblock = Res(out_dim, temb=512)

    def forward(self, sampled, index):  # sampled [B, d, k], index [B, k]
        b, d, _ = sampled.shape
        n = self.hw * self.hw
        full = torch.zeros(b, d, n)
        mask = torch.zeros(b, n)
        for i in range(b):                         # one image at a time, like the official code
            rest = [j for j in range(n) if j not in index[i].tolist()]
            full[i][:, index[i]] = sampled[i]
            full[i][:, rest] = self.mask_token[0]
            mask[i, index[i]] = 1.0
        x = self.conv_in(self.post_projection(full.view(b, d, self.hw, self.hw)))
        mask = mask + self.mask_init * (1 - mask)
        for blk in self.transformer.blocks:
            x = blk.attn(blk.resblock(x), mask)
            mask = torch.sqrt(mask)
        return self.transformer.last_resblock(x)


class Quant(nn.Module):
    def __init__(self, k, d):
        super().__init__()
        self.codebook = nn.Embedding(k + 1, d, padding_idx=k)
        self.codebook.register_buffer("cluster_size_ema", torch.rand(k) + 1)
        self.codebook.register_buffer("embed_ema", torch.randn(k, d))
        self.k = k

    def forward(self, x):  # x [B, d, n] -> codes [B, n]
        flat = x.permute(0, 2, 1)
        e = self.codebook.weight[: self.k]
        dist = (flat ** 2).sum(-1, keepdim=True) - 2 * flat @ e.t() + (e ** 2).sum(-1)
        return dist.argmin(-1)


class OfficialMQVAE(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        e, m, d, q = (p[k]["params"] for k in ("encoder_config", "masker_config", "demasker_config", "vqconfig"))
        self.encoder = Enc(e["ch"], e["ch_mult"], e["num_res_blocks"], e["attn_resolutions"], e["resolution"], e["z_channels"])
        self.decoder = Dec(e["ch"], e["ch_mult"], e["num_res_blocks"], e["attn_resolutions"], e["resolution"])
        self.masker = Masker(m["topk_ratio"], m["input_token_num"], m["input_dim"], m["codebook_dim"])
        self.demasker = Demasker(d["codebook_dim"], d["output_dim"], d["height_and_width"], d["n_layer"], d["mask_init_value"])
        self.quantize = Quant(q["codebook_size"], q["codebook_dim"])
        for mod in self.modules():  # non-trivial norms so the test sees them carried over
            if isinstance(mod, (nn.GroupNorm, nn.BatchNorm2d)) and mod.weight is not None:
                nn.init.normal_(mod.weight, 1.0, 0.1)
                nn.init.normal_(mod.bias, 0.0, 0.1)
        bn = self.masker.score_pred_net[4]
        bn.running_mean.fill_(0.1)
        bn.running_var.fill_(0.5)

    @torch.no_grad()
    def encode(self, x):
        sampled, index = self.masker(self.encoder(x))
        return self.quantize(sampled), index          # codes and positions in score order

    @torch.no_grad()
    def decode(self, codes, index):
        q = self.quantize.codebook(codes).permute(0, 2, 1)
        return self.decoder(self.demasker(q, index))
