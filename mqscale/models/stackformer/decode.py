"""Algorithm 1 with a compiled decoding step: a static KV cache and one torch.compile'd graph per
(batch, L, sampling settings), gpt-fast style.

Why: a KV-cached step is small GEMMs (M = batch) plus dozens of tiny ops per layer; eagerly, each
op pays its dispatch and each GEMM re-reads weights laid out for training. Compiled, a step is one
graph: pointwise work fused into the GEMMs' neighbours, on a CPU the weights frozen into the graph
and prepacked for oneDNN (``freeze``), on a GPU the whole step replayed as a CUDA graph
(``mode="reduce-overhead"``). The graph covers both stacks, both heads, guidance and both draws;
only the uniforms of the draws come from outside (``torch.Generator`` cannot be traced), drawn in
the eager sampler's order, so a seed gives the same samples up to float rounding, and greedy fp32
decoding gives the same sequences.

Shapes never change inside a batch: ``StaticKVCache`` (``layers.py``) holds the fill level as a
tensor and every step attends over the whole buffer under a mask; the step index and the position
bookkeeping are tensors updated in place. After the warm-up the loop runs under
``fail_on_recompile``: a recompilation is raised as a ``CompileError``, never suffered silently.

``freeze=True`` bakes the weights into the graph: right for an exported model, wrong for one that
trains on (the trainer's sample grids pass ``freeze=False``); a frozen decoder refuses to run once
its weights have changed (``stale``). ``dtype=torch.bfloat16`` decodes with a bf16 copy of the
weights (frozen only): a step's GEMMs are M = batch, bound by reading the weights, so halving
their bytes pays where the hardware has bf16 matmul (``bf16_matmul``); the draws stay fp32.

``Decoding`` is what the commands hold: ``compile`` "on", "off" or "auto" (compile when the
images asked for pay for the compile: ``pays``), decoders kept per shape, compile time counted
apart (``compile_s``), never inside a rate.
"""
from __future__ import annotations

import copy
import itertools
import time
import types

import torch

from mqscale.core import compiling
from mqscale.core.errors import CompileError
from mqscale.models.stackformer.model import Stackformer
from mqscale.models.stackformer.sampling import (
    SamplingParams,
    _Guidance,
    _masks,
    _setup,
    _split,
    allowed_positions,
    draw,
    sample,
    uniforms,
)

_serial = itertools.count()


def _step(dec: "CompiledDecoder", x: torch.Tensor, u_first, u_second):
    return dec._step(x, u_first, u_second)


def _own_code(fn):
    """``fn`` with a code object of its own. Why: torch.compile keeps its compiled graphs, and its
    recompilation limit, per code object; each decoder (another shape, another model) is its own
    function to it, not the n-th recompilation of one shared function."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_serial)}")
    return types.FunctionType(code, fn.__globals__, code.co_name)


class CompiledDecoder:
    """One compiled Algorithm 1 step for a model, batch, L and sampling settings."""

    def __init__(self, model: Stackformer, batch: int, seq_len: int | None = None, *,
                 code: SamplingParams = SamplingParams(), pos: SamplingParams = SamplingParams(),
                 raster: bool = True, guidance: float | None = None, freeze: bool = True,
                 dtype: torch.dtype | None = None):
        B, L, device = _setup(model, None, batch, seq_len)
        self.source, self.B, self.L, self.device = model, B, L, device
        dtype = dtype or next(model.parameters()).dtype
        if dtype != next(model.parameters()).dtype:
            if not freeze:
                raise ValueError("a decoder in another dtype than its model's decodes a copy of the weights: "
                                 "only with freeze=True (weights that no longer change)")
            model = copy.deepcopy(model).to(dtype)
        self.model = model
        # the activations' dtype: the weights', or autocast's where the caller compiles under it
        self.dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                      else dtype)
        dtype = self.dtype
        self.guide = _Guidance(model, guidance)
        self.rows = 2 * B if self.guide.on else B
        self.first_params, self.second_params = _split(model, code, pos)
        self.raster, self.freeze = raster, freeze
        self.settings = (code, pos, raster, guidance)
        P = model.cfg.prefix_len
        self.first_cache = model.first.new_cache(self.rows, P + L - 1, device, dtype, static=True)
        self.second_cache = model.second.new_cache(self.rows, L, device, dtype, static=True)
        G = model.cfg.n_positions
        self.used = torch.zeros(B, G, dtype=torch.bool, device=device)
        self.prev = torch.full((B,), -1, dtype=torch.long, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        for s in (self.used, self.prev, self.t):
            torch._dynamo.mark_static_address(s)
        cuda = device.type == "cuda"
        opts = dict(mode="reduce-overhead") if cuda else {}
        self.mode = "CUDA graphs" if cuda else ("frozen, prepacked weights" if freeze else "weights as inputs")
        self._compiled = torch.compile(_own_code(_step), fullgraph=True, dynamic=False, **opts)
        self._versions = self._weight_versions()
        self.compile_s = self._warm_up()

    # ------------------------------------------------------------------ the graph

    def _step(self, x: torch.Tensor, u_first, u_second):
        """Feed x [rows, 1, C] to the first stack, draw, feed the second, draw; returns this step's
        codes [B], positions [B] and the next input embedding."""
        m, g = self.model, self.guide
        h = m.first_stream(x, self.first_cache)
        first_allowed, second_allowed = _masks(m, allowed_positions(self.used, self.prev, self.t, self.L,
                                                                     self.raster))
        a = draw(g.mix(m.first_logits(h)[:, 0]), self.first_params, first_allowed, u=u_first)
        s = m.second_stream(h, g.expand(a)[:, None], self.second_cache)
        b = draw(g.mix(m.second_logits(s)[:, 0]), self.second_params, second_allowed, u=u_second)
        codes, positions = _split(m, a, b)
        self.used.scatter_(1, positions[:, None], True)
        self.prev.copy_(positions)
        self.t.add_(1)
        return codes, positions, m.token_embedding(g.expand(codes[:, None]), g.expand(positions[:, None]))

    def _uniforms(self, generator):
        f, s = self.first_params.temperature, self.second_params.temperature
        return (uniforms(self.B, generator, self.device) if f > 0 else None,
                uniforms(self.B, generator, self.device) if s > 0 else None)

    def _reset(self) -> None:
        self.first_cache.reset()
        self.second_cache.reset()
        self.used.zero_()
        self.prev.fill_(-1)
        self.t.zero_()

    def _call(self, x, u_first, u_second):
        if self.device.type != "cuda":
            return self._compiled(self, x, u_first, u_second)
        torch.compiler.cudagraph_mark_step_begin()
        # a CUDA graph's outputs live in its memory pool and the next replay overwrites them
        return tuple(t.clone() for t in self._compiled(self, x, u_first, u_second))

    @torch.no_grad()
    def _warm_up(self) -> float:
        """Compile (and on a GPU record the CUDA graph) on a dummy batch: the compile time, apart."""
        was_training = self.model.training
        self.model.eval()
        try:
            t = time.perf_counter()
            x = torch.zeros(self.rows, 1, self.model.cfg.n_embd, device=self.device, dtype=self.dtype)
            gen = torch.Generator(self.device).manual_seed(0)
            # freezing is read from inductor's global config while it compiles (its per-call
            # options do not reach the freezing pass); the first call compiles
            with torch._inductor.config.patch(freezing=self.freeze and self.device.type != "cuda"):
                self._call(x, *self._uniforms(gen))
            for _ in range(2 if self.device.type == "cuda" else 1):
                self._call(x, *self._uniforms(gen))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 (whatever inductor raised: one line naming it)
            first = (str(e).strip().splitlines() or ["no message"])[0][:300]
            raise CompileError(f"compiled decoding: torch.compile failed ({type(e).__name__}: {first})") from e
        finally:
            self._reset()
            self.model.train(was_training)

    # ------------------------------------------------------------------ sampling

    def _weight_versions(self) -> list[int]:
        return [p._version for p in self.source.parameters()]

    @property
    def stale(self) -> bool:
        """A frozen decoder whose model's weights changed since it was compiled."""
        return self.freeze and self._weight_versions() != self._versions

    def matches(self, model: Stackformer, batch: int, seq_len: int, settings: tuple) -> bool:
        return model is self.source and batch == self.B and seq_len == self.L and settings == self.settings

    @torch.no_grad()
    def sample(self, cond: torch.Tensor | None = None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [B, L] and positions [B, L], as ``sampling.sample`` returns them."""
        m = self.model
        if self.stale:
            raise CompileError("compiled decoding: the model's weights changed since they were frozen "
                               "into the graph; build a new decoder (or one with freeze=False)")
        if (cond.shape[0] if cond is not None else self.B) != self.B:
            raise ValueError(f"this decoder was compiled for batch {self.B}, got {cond.shape[0]} conditions")
        was_training = m.training
        m.eval()
        self._reset()
        try:
            x = self.guide.prefix(m, cond, self.B).to(self.dtype)
            if x.shape[1] > 1:  # a text prefix: all but its last token go into the cache at once
                m.first_stream(x[:, :-1], self.first_cache)
                x = x[:, -1:]
            x = x.contiguous()  # the warm-up's strides: a guard checks them
            codes = torch.empty(self.B, self.L, dtype=torch.long, device=self.device)
            positions = torch.empty_like(codes)
            with torch.compiler.set_stance("fail_on_recompile"):  # step 0 checks every guard
                codes[:, 0], positions[:, 0], x = self._call(x, *self._uniforms(generator))
            # later steps feed the graph its own output and fresh uniforms of the same shapes, with the
            # model's mode and grad mode pinned here: nothing a guard checks can change, so skip them
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                for t in range(1, self.L):
                    a, b, x = self._call(x, *self._uniforms(generator))
                    codes[:, t], positions[:, t] = a, b
            return codes, positions
        except RuntimeError as e:
            if "recompil" in str(e).lower():
                raise CompileError(f"compiled decoding recompiled inside a batch (batch {self.B}, L {self.L}): "
                                   f"{(str(e).strip().splitlines() or [''])[0][:300]}") from e
            raise
        finally:
            m.train(was_training)


def bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 GEMMs run natively here (a GPU with bf16, a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Decoding:
    """Eager or compiled decoding, chosen per (model, batch, L, settings, dtype), with the compiled
    decoders kept for reuse.

    ``compile``: "on" compiles every shape (a platform that cannot compile is a ``CompileError``
    naming why); "off" never; "auto" runs a shape's first batch eagerly and compiles it only when
    the batches still to come pay for the compile (``pays``), and stays eager, saying why once,
    where inductor cannot compile. ``compile_s`` sums the compile time, so a rate can leave it
    out; ``last`` says how the last batch was decoded ("eager" / "compiled")."""

    SAVING = 0.5                # share of an eager batch's time a compiled one saves, at least (bench/sampling.py)
    FIRST_COMPILE_S = 60.0      # a first compile's cost before one is measured in this process

    def __init__(self, compile: str = "auto", freeze: bool = True, say=None):
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {compile!r}")
        self.compile, self.freeze, self.say = compile, freeze, say or (lambda line: None)
        self.compile_s, self.compiles, self.last = 0.0, 0, ""
        self._decoders: dict = {}
        self._eager_s: dict = {}
        self._refused: str | None = None

    def pays(self, eager_s: float, batches_left: int) -> bool:
        """Whether compiling for ``batches_left`` more batches of eager cost ``eager_s`` saves more
        than the compile costs (the mean compile so far, else ``FIRST_COMPILE_S``)."""
        cost = self.compile_s / self.compiles if self.compiles else self.FIRST_COMPILE_S
        return batches_left * eager_s * self.SAVING > cost

    def _can_compile(self, device: torch.device) -> bool:
        problem = compiling.inductor_problem(device.type)  # a tiny compile, once per process
        if problem is None:
            return True
        if self.compile == "on":
            raise CompileError(f"compiled decoding is on, but inductor cannot compile on {device.type} here: "
                               f"{problem}")
        if self._refused is None:
            self._refused = problem
            self.say(f"note: decoding eagerly: inductor cannot compile on {device.type} here ({problem})")
        return False

    @torch.no_grad()
    def sample(self, model: Stackformer, cond: torch.Tensor | None, *, batch: int, seq_len: int | None = None,
               code: SamplingParams = SamplingParams(), pos: SamplingParams = SamplingParams(),
               raster: bool = True, generator: torch.Generator | None = None, guidance: float | None = None,
               batches_left: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``sampling.sample``'s result, eagerly or compiled; ``batches_left``: batches of this shape
        still to come after this one (``auto`` weighs them against the compile)."""
        device = next(model.parameters()).device
        L = seq_len or model.cfg.seq_len
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else None
        key = (id(model), batch, L, code, pos, raster, guidance, dtype)
        dec = self._decoders.get(key)
        if dec is not None and dec.stale:  # frozen weights that changed: compile anew
            del self._decoders[key]
            dec = None
        if dec is None and self._wants(key, batches_left) and self._can_compile(device):
            dec = self._decoders[key] = self._build(model, batch, L, code, pos, raster, guidance, dtype,
                                                    autocast, device)
        if dec is not None:
            self.last = "compiled"
            with torch.autocast(device.type, enabled=autocast and not self.freeze):
                return dec.sample(cond, generator)
        self.last = "eager"
        t = time.perf_counter()
        out = sample(model, cond, batch=batch, seq_len=L, code=code, pos=pos, raster=raster,
                     generator=generator, guidance=guidance)
        if device.type == "cuda":
            torch.cuda.synchronize()
        self._eager_s[key] = time.perf_counter() - t
        return out

    def _wants(self, key, batches_left: int) -> bool:
        if self.compile != "auto":
            return self.compile == "on"
        return key in self._eager_s and self.pays(self._eager_s[key], batches_left + 1)

    def _build(self, model, batch, L, code, pos, raster, guidance, dtype, autocast, device) -> CompiledDecoder:
        # frozen weights decode a copy in autocast's dtype (bf16 weights, no casts per step);
        # weights that train on are compiled under the caller's autocast, as the eager sampler runs
        with torch.autocast(device.type, enabled=autocast and not self.freeze):
            dec = CompiledDecoder(model, batch, L, code=code, pos=pos, raster=raster, guidance=guidance,
                                  freeze=self.freeze, dtype=dtype if self.freeze else None)
        self.compile_s += dec.compile_s
        self.compiles += 1
        self.say(f"compiled decoding for batch {batch}, L {L} ({dec.mode}): {dec.compile_s:.1f} s to compile")
        return dec
