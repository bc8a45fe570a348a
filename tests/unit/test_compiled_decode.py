"""The compiled decoder: the eager sampler's sequences, one graph per shape, errors that name why.

Compiles are slow on 2 cores (10-25 s for a tiny model), so each test compiles at most once and
the module shares its decoders.
"""
from __future__ import annotations

import pytest
import torch

from mqscale.core import compiling
from mqscale.core.compiling import CompileWatch, graphs_compiled, inductor_problem
from mqscale.core.errors import CompileError
from mqscale.models.stackformer.decode import CompiledDecoder, Decoding
from mqscale.models.stackformer.sampling import SamplingParams, sample
from tests.helpers.models import GREEDY, conds, tiny

TOPK = SamplingParams(temperature=1.2, top_k=10)


def gen(seed=5):
    return torch.Generator().manual_seed(seed)


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.fixture(scope="module")
def guided():
    """A class model decoded greedily with classifier-free guidance, compiled once."""
    m = tiny("code_first", "class")
    return m, CompiledDecoder(m, 3, code=GREEDY, pos=GREEDY, guidance=2.0)


def test_greedy_fp32_sequences_equal_the_eager_sampler_and_steps_never_recompile(guided):
    m, dec = guided
    c = conds(m)
    before = graphs_compiled()
    got = dec.sample(c)
    again = dec.sample(conds(m, 3).flip(0))  # another batch of the same shape: the same graph
    assert graphs_compiled() == before, "a step or a second batch compiled a new graph"
    assert same(got, sample(m, c, batch=3, code=GREEDY, pos=GREEDY, guidance=2.0))
    assert same(again, sample(m, conds(m, 3).flip(0), batch=3, code=GREEDY, pos=GREEDY, guidance=2.0))
    assert dec.compile_s > 0 and dec.mode == "frozen, prepacked weights"


def test_text_prefix_and_position_first_seeded_draws_match_eager():
    """Stackformer_r with a text prefix (the prefix goes into the static cache eagerly, the steps
    compiled) and seeded top-k draws: the uniforms come from outside the graph in the eager order."""
    m = tiny("pos_first", "text")
    c = conds(m)
    dec = CompiledDecoder(m, 3, code=TOPK, pos=TOPK, raster=False)
    got = dec.sample(c, gen())
    assert same(got, sample(m, c, batch=3, code=TOPK, pos=TOPK, raster=False, generator=gen()))
    assert same(got, dec.sample(c, gen())) and not same(got, dec.sample(c, gen(6)))
    assert all(len(set(row.tolist())) == 16 for row in got[1])  # positions never repeat


def test_auto_compiles_only_when_the_batches_to_come_pay_for_it():
    d = Decoding("auto")
    assert d.pays(eager_s=1.0, batches_left=200) and not d.pays(eager_s=0.05, batches_left=3)
    m = tiny()
    c = conds(m)
    for left in (2, 1, 0):  # three batches of a tiny model: never worth a compile
        assert same(d.sample(m, c, batch=3, code=GREEDY, pos=GREEDY, batches_left=left),
                    sample(m, c, batch=3, code=GREEDY, pos=GREEDY))
        assert d.last == "eager"
    assert d.compiles == 0
    with pytest.raises(ValueError, match="auto, on or off"):
        Decoding("yes")


def test_a_platform_that_cannot_compile_is_one_line_under_on_and_eager_under_auto(monkeypatch):
    said = []
    monkeypatch.setattr(compiling, "inductor_problem", lambda device: "no C++ compiler found (g++)")
    m = tiny()
    c = conds(m)
    with pytest.raises(CompileError, match="inductor cannot compile on cpu here: no C\\+\\+ compiler"):
        Decoding("on").sample(m, c, batch=3, code=GREEDY, pos=GREEDY)
    d = Decoding("auto", say=said.append)
    d.FIRST_COMPILE_S = 0.0  # it would pay at once
    for _ in range(3):
        d.sample(m, c, batch=3, code=GREEDY, pos=GREEDY, batches_left=100)
    assert d.last == "eager" and d.compiles == 0
    assert said == ["note: decoding eagerly: inductor cannot compile on cpu here (no C++ compiler found (g++))"]


def test_inductor_problem_is_none_here_and_names_why_it_cannot_compile_for_a_missing_device():
    assert inductor_problem("cpu") is None
    missing = "xpu" if torch.cuda.is_available() else "cuda"  # a device this torch build lacks
    problem = inductor_problem(missing)
    assert problem is not None and "\n" not in problem and len(problem) < 300
    if missing == "cuda":
        assert problem == "AssertionError: Torch not compiled with CUDA enabled"


def test_a_recompilation_storm_is_detected_and_named():
    fn = torch.compile(lambda x: (x * 2).sum(), dynamic=False)
    watch = CompileWatch("the test step", limit=2)
    fn(torch.ones(3))
    watch.arm("[3]")
    fn(torch.ones(3))
    assert watch.check("[3]") == 0
    fn(torch.ones(4))
    assert watch.check("[4]") == 1
    fn(torch.ones(5))
    with pytest.raises(CompileError, match=r"the test step: recompilation storm, 2 recompilations .*\[4\], \[5\]"):
        watch.check("[5]")


def test_decoding_on_compiles_once_per_shape_and_gives_the_eager_samples():
    m = tiny("code_first", "none")
    d = Decoding("on")
    first = d.sample(m, None, batch=2, code=TOPK, pos=TOPK, generator=gen())
    assert d.last == "compiled" and d.compiles == 1 and d.compile_s > 0
    assert same(first, sample(m, None, batch=2, code=TOPK, pos=TOPK, generator=gen()))
    assert same(first, d.sample(m, None, batch=2, code=TOPK, pos=TOPK, generator=gen())) and d.compiles == 1


def test_a_frozen_decoder_refuses_weights_that_changed(guided):
    m, dec = guided  # (the last test of the module to use this model: its weights change here)
    with torch.no_grad():
        m.code_emb.weight.mul_(3.0)
    assert dec.stale
    with pytest.raises(CompileError, match="weights changed since they were frozen"):
        dec.sample(conds(m))


@pytest.mark.heavy
def test_decoding_compiles_anew_when_frozen_weights_changed():
    m = tiny()
    c = conds(m)
    d = Decoding("on")
    d.sample(m, c, batch=3, code=GREEDY, pos=GREEDY)
    with torch.no_grad():
        m.code_emb.weight.mul_(3.0)
    assert same(d.sample(m, c, batch=3, code=GREEDY, pos=GREEDY), sample(m, c, batch=3, code=GREEDY, pos=GREEDY))
    assert d.compiles == 2


@pytest.mark.heavy
def test_bf16_weights_decode_valid_sequences():
    m = tiny()
    c = conds(m)
    dec = CompiledDecoder(m, 3, code=GREEDY, pos=GREEDY, dtype=torch.bfloat16)
    codes, pos = dec.sample(c)
    assert next(dec.model.parameters()).dtype == torch.bfloat16 and next(m.parameters()).dtype == torch.float32
    assert (codes >= 0).all() and (codes < m.cfg.codebook_size).all()
    assert (pos.diff(dim=1) > 0).all()  # raster order
