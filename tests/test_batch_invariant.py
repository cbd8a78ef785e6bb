"""Batch-invariant FP8-dynamic evaluation (pipeline/backends/batch_invariant.py): the FP8 Linear is
exact (float64 path) or summed in fixed-shape float32 tiles (checked at load), every token's output
is independent of the batch either way, and the loaded FP8 row, with prefix sharing, scores exactly
as stock lm-eval at batch size 1 on the same patched model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FIXED_TEXT
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.backends import batch_invariant as bi
from pipeline.backends import invariant_attention as ia
from pipeline.backends import invariant_linear as il


@pytest.fixture(scope="module")
def fp8_artifact(tiny_model, tmp_path_factory):
    """The FP8-dynamic row of the tiny model, quantized by the real stage: every test using it is slow."""
    from pipeline.stages.base import Artifact, StageContext
    from pipeline.stages.registry import get_stage

    torch.set_grad_enabled(False)
    cls = get_stage("fp8")
    out = tmp_path_factory.mktemp("fp8")
    stage = cls(cls.Params.model_validate({"scheme": "FP8_DYNAMIC"}))
    return stage.run(Artifact(tiny_model, "hf", key="b"), out, StageContext(lambda: [], 64, 0))


def _load(art):
    return AutoModelForCausalLM.from_pretrained(art.path, dtype="auto").eval()


@pytest.mark.slow
def test_fp8_linear_is_exact_and_each_row_is_independent_of_the_batch(fp8_artifact):
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    stock = _load(fp8_artifact)
    stock(torch.zeros((1, 1), dtype=torch.long))  # transformers decompresses on the first forward
    model = _load(fp8_artifact)
    assert "exact in float64" in bi.install(model, tiles=False)
    linears = bi.quantized_linears(model)
    assert len({id(m.forward.inputs) for _, m in linears}) == 1  # one quantized-input memo for the model's layers
    name, lin = linears[3]
    ref = stock.get_submodule(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, lin.in_features, generator=gen) * torch.logspace(-3, 2, 9)[None, :, None]
    x[1, 2] = 0  # an all-zero token: its scale is float32's eps, as compressed-tensors sets it

    # the input codes and scales are compressed-tensors' own: codes x scale is its fake-quantized input
    codes, scale = il.quantize_input(x, lin.quantization_scheme.input_activations, None)
    assert torch.equal(codes * scale, forward_quantize(ref, x, "input", ref.quantization_scheme.input_activations))
    # the weight codes x scales are the decompressed weight stock multiplies with
    assert torch.equal(lin.weight * lin.weight_scale, ref.weight)

    # exact: integer arithmetic (codes are multiples of 2^-9) gives the same float64 accumulator
    y = _rows_alone_beside_others_and_padded(lin, x, gen)  # each row's output is the same in any batch
    exact = ((codes * 512).long() @ (lin.weight * 512).long().T).double() / 2**18
    assert torch.equal(y, (exact * scale.double() * lin.weight_scale.double().reshape(-1)).float())
    # and it is stock's product up to float32 summation error (relative to each token's largest output)
    want = ref(x)
    assert ((y - want).abs().amax(-1) <= 1e-5 * want.abs().amax(-1)).all() and not torch.equal(y, want)


def _rows_alone_beside_others_and_padded(lin, x, gen):
    """Each of a few rows computed alone, beside other rows, and in a padded batch: all == its value in x's batch."""
    y = lin(x)
    for r, t in [(0, 0), (2, 5), (3, 8)]:
        alone = lin(x[r : r + 1, t : t + 1])
        neighbours = lin(torch.cat([x[r : r + 1, : t + 1], torch.randn(1, 40, lin.in_features, generator=gen)], 1))[:, t : t + 1]
        padded = lin(torch.cat([x, torch.zeros(3, 9, lin.in_features)]).reshape(7, 9, -1))[r : r + 1, t : t + 1]
        for got in (alone, neighbours, padded):
            assert torch.equal(got, y[r : r + 1, t : t + 1])
    return y


@pytest.mark.slow
def test_fp8_linear_in_float32_tiles_is_independent_of_the_batch(fp8_artifact):
    """Where the load-time check passes (a CPU BLAS that sums each row of a fixed-shape call in one
    order), the float32 path gives each row the same bits in any batch, and is the exact product
    of stock's operands up to float32 summation error; the check is what install uses by default on a CPU."""
    model = _load(fp8_artifact)
    how = bi.install(model)
    if "float32" not in how:
        pytest.skip(f"this machine's BLAS failed the load-time check, so install chose: {how}")
    name, lin = bi.quantized_linears(model)[3]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, lin.in_features, generator=gen) * torch.logspace(-3, 2, 9)[None, :, None]
    y = _rows_alone_beside_others_and_padded(lin, x, gen)
    codes, scale = il.quantize_input(x, lin.quantization_scheme.input_activations, None)
    # the tiles multiply stock's operands: the fake-quantized input by the decompressed weight (codes x scales)
    assert torch.equal(il.fp8_codes(lin.weight / lin.weight_scale) * lin.weight_scale, lin.weight)
    exact = ((codes * scale).double() @ lin.weight.double().T).float()
    assert ((y - exact).abs().amax(-1) <= 1e-5 * exact.abs().amax(-1)).all() and not torch.equal(y, exact)


def test_the_load_time_check_refuses_arithmetic_that_depends_on_the_other_rows():
    """tiles_are_invariant refuses a GEMM whose rows depend on the rest of the batch (a per-tensor
    input scale, as static activation quantization computed at run time would use) and one whose
    summation order depends on the row count (float32 summed in as many K splits as rows), and
    passes one whose sums are exact (invariant on any machine)."""
    torch.manual_seed(0)
    wt = il.fp8_codes(torch.randn(96, 200) * 8).T

    def per_tensor_scale(x, w):
        s = x.abs().amax() / 448
        return il.fp8_codes(x / s) @ w * s

    def splits_by_row_count(x, w):  # K summed in as many chunks as there are rows
        return sum(c @ wc for c, wc in zip(x.chunk(x.shape[0], 1), w.chunk(x.shape[0], 0)))

    assert not il.tiles_are_invariant(wt, per_tensor_scale)
    assert not il.tiles_are_invariant(wt, splits_by_row_count)
    assert il.tiles_are_invariant(wt, lambda x, w: (x.double() @ w.double()).float())


def test_the_attention_load_check_passes_fp32_blocks_and_float64_and_refuses_sdpa():
    """attention_is_invariant (what install runs at load) refuses transformers' SDPA attention,
    whose blocking follows the number of queries and keys, passes the float64 path, and passes
    f32_attention where this BLAS computes fixed-shape GEMM rows alike; f32_attention is the
    float64 value up to float32 rounding, on a causal pass, a padded suffix after cached keys and
    a fully masked (padding) query, which gets zeros, not NaN."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert not ia.attention_is_invariant(9, 3, 64, attention=sdpa_attention_forward)
    assert ia.attention_is_invariant(9, 3, 64, attention=ia.fp64_attention)
    if not ia.attention_is_invariant(9, 3, 64):
        pytest.skip("this machine's BLAS failed the attention check: install uses float64 attention here")
    assert ia.attention_is_invariant(16, 4, 32) and ia.attention_is_invariant(4, 4, 16)

    class Module:
        is_causal, num_key_value_groups = True, 3

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, n, 64, generator=gen) for h, n in ((9, 300), (3, 300), (3, 300)))
    got, want = ia.f32_attention(Module(), q, k, v, None)[0], ia.fp64_attention(Module(), q, k, v, None)[0]
    assert (got - want).abs().max() < 1e-5 and not torch.equal(got, want)
    # 40 new queries after 260 cached keys, row 1 right-padded to 25 tokens; its query 30 is padding
    keys = torch.arange(300)
    mask = (keys <= torch.arange(260, 300)[:, None])[None] & (keys < torch.tensor([300, 285])[:, None, None])
    mask[1, 30] = False
    got = ia.f32_attention(Module(), q[:, :, 260:], k, v, mask[:, None])[0]
    want = ia.fp64_attention(Module(), q[:, :, 260:], k, v, mask[:, None])[0]
    assert (got - want).abs().max() < 1e-5 and torch.equal(got[1, 30], torch.zeros_like(got[1, 30]))


def test_q_k_v_share_one_quantized_input_until_it_changes():
    """Projections that read the same tensor (q/k/v, gate/up) get the codes computed once; an
    in-place change or another tensor is quantized again, and the codes are always
    quantize_input's. The memo is dropped with its input, so no activation outlives a forward
    (that install gives all of a model's FP8 layers one memo: test_fp8_linear_is_exact_...)."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)  # FP8_DYNAMIC's input
    shared = il.SharedInput()
    x = torch.randn(2, 5, 64)
    first = shared(x, args, None)
    assert shared(x, args, None) is first
    for a, b in zip(first, il.quantize_input(x, args, None)):
        assert torch.equal(a, b)
    x.mul_(3)
    again = shared(x, args, None)
    assert again is not first and torch.equal(again[1], il.quantize_input(x, args, None)[1]) and not torch.equal(again[1], first[1])
    assert shared(x.clone(), args, None) is not again
    assert il.SharedInput()(x, args, None) is not again  # another model's memo
    y = torch.randn(3, 4, 64)
    shared(y, args, None)
    assert shared.entry is not None
    del y
    assert shared.entry is None


def _requests():
    """MMLU-like: one long shared preamble, several questions with several continuations each, a
    request sharing nothing, and one left-truncated to max_length."""
    reqs = []
    for q in range(3):
        ctx = f"{FIXED_TEXT}\n\n{FIXED_TEXT[: 30 * q]}\nQ: what does sort do with key number {q}?\nA:"
        for answer in (" it sorts", " it returns a new list in ascending order", " B"):
            reqs.append(Instance("loglikelihood", {}, (ctx, answer), idx=len(reqs)))
    reqs.append(Instance("loglikelihood", {}, ("Unrelated", " text"), idx=len(reqs)))
    reqs.append(Instance("loglikelihood", {}, (FIXED_TEXT * 8, " end of the text"), idx=len(reqs)))
    return reqs


@pytest.mark.slow
@pytest.mark.parametrize("tiles", [True, False], ids=["float32-tiles-if-checked", "float64"])
def test_loaded_fp8_row_shares_prefixes_and_scores_exactly_as_stock_at_batch_size_1(fp8_artifact, tiny_model, tiles, monkeypatch):
    """The FP8 row as quantpipe loads it (prefix sharing on, batches of 3 and 8) gives the same
    (log-likelihood, greedy) pairs, ==, as stock HFLM at batch size 1 and at batch size 8 on the same
    patched model, and the same generations: on the default path (float32 tiles where the load-time
    check passes) and on the float64 path."""
    from pipeline.backends import load as load_for_eval

    monkeypatch.setattr(bi, "FLOAT32_TILES", tiles)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = _requests()
    loaded = load_for_eval(fp8_artifact, "float32", batch_size=3, max_length=256)
    assert loaded.lm.prefix_caching and "batch-invariant" in loaded.evaluated_as
    assert tiles or "exact in float64" in loaded.evaluated_as
    assert ("attention float32" in loaded.evaluated_as) == ("float32 in fixed" in loaded.evaluated_as)  # with the tiles
    # float32 attention takes packed suffixes (unpacked into the padded batch inside it)
    assert loaded.lm.packing == ("attention float32" in loaded.evaluated_as)
    model = loaded.lm.model
    kw = dict(pretrained=model, tokenizer=tok, device="cpu", max_length=256)
    want = HFLM(batch_size=1, **kw).loglikelihood(reqs)
    before = dataclasses.replace(loaded.lm.packed)
    assert loaded.lm.loglikelihood(reqs) == want
    # packed rows ran where packing is on (answers sharing their question's trie nodes), else none
    packed = loaded.lm.packed.since(before)
    assert (packed.rows > 0) == loaded.lm.packing and (packed.nodes < packed.suffix_tokens) == loaded.lm.packing
    assert HFLM(batch_size=8, **kw).loglikelihood(reqs) == want
    loaded.lm.batch_size_per_gpu = 8
    assert loaded.lm.loglikelihood(reqs) == want

    gen = {"until": ["\n\n\n"], "max_gen_toks": 24, "do_sample": False}
    prompts = [Instance("generate_until", {}, (FIXED_TEXT[: 60 + 70 * i], gen), idx=i) for i in range(3)]
    assert loaded.lm.generate_until(prompts) == HFLM(batch_size=1, **kw).generate_until(prompts)


@pytest.mark.slow
def test_another_activation_kernel_recomputes_the_fp8_row_and_reuses_the_rest(tiny_model, data_dir, tmp_path, monkeypatch):
    """The batch-invariant evaluation is another computation: run again with another
    TransformersBackend.activation_kernel, the FP8 row's stored KL is recomputed, not reused, and its
    evaluations get new keys, while its build, the base's KL reference and the evaluations of the
    base and of a weight-only row are what they were."""
    from test_pipeline import write_recipe

    from pipeline.backends.hf import TransformersBackend
    from pipeline.isolation import ModelSlot
    from pipeline.job import Job
    from pipeline.recipe import load_recipe

    variants = {"fp8": [{"stage": "fp8"}], "gptq": [{"stage": "gptq"}]}
    path = write_recipe(tmp_path, tiny_model, data_dir, variants=variants, tasks={"humaneval": None})

    def run() -> tuple[dict, dict]:
        """(eval keys by row and task, reused by step kind) of the base's and the FP8 row's builds and KL steps, run."""
        job = Job(load_recipe(path), tmp_path / "artifacts")
        job.prepare()
        plan, slot = job.plan(), ModelSlot(job)
        reused = {s.kind: job.run_step(s, slot) for s in plan.steps if s.kind != "eval" and s.row in ("base", "fp8")}
        return {(s.row, s.task): s.key for s in plan.steps if s.kind == "eval"}, reused

    keys, reused = run()
    assert reused == {"build": False, "kl_reference": False, "kl": False}
    assert run()[1] == {"build": True, "kl_reference": True, "kl": True}  # the same computation: all reused
    monkeypatch.setattr(TransformersBackend, "activation_kernel", "another-kernel")
    again, reused = run()
    assert reused == {"build": True, "kl_reference": True, "kl": False}
    assert {row for (row, task), key in again.items() if key != keys[row, task]} == {"fp8"}
    assert {row for row, _ in keys} == {"base", "fp8", "gptq"}


def test_rows_go_into_the_smallest_tile_that_holds_them_with_little_padding_else_the_largest_that_fits():
    def tiles(m, pad_up=il.PAD_UP):
        return [t for _, t in il.tile_spans(m, il.TILES, pad_up)]

    assert tiles(460) == [512]  # 11% padding: one fast call
    assert tiles(600) == [512, 64, 16, 8]  # 1,024 would pad by 71%; the last tile holds 8 of 8
    assert tiles(3) == [8] and tiles(2048) == [1024, 1024]
    assert tiles(460, pad_up=1.0) == [256, 128, 64, 8, 8]  # attention's rule: no padding up
    for m in range(1, 3000, 7):
        got = list(il.tile_spans(m, il.TILES, il.PAD_UP))
        assert [a for a, _ in got] == [sum(t for _, t in got[:i]) for i in range(len(got))]
        assert sum(t for _, t in got[:-1]) < m <= sum(t for _, t in got)  # covers m, only the last tile padded


def test_tiled_lm_head_gives_each_row_the_same_logits_in_any_batch():
    """The float32 head runs [t, hidden] (t in TILES) x [hidden, <= COL_BLOCK] calls: a row's logits, across
    several column blocks, are the same alone as in batches of 5 and 40, and float32-close to exact."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 2 * il.COL_BLOCK + 5, bias=False)
    if not all(il.tiles_are_invariant(wt) for wt in il.call_shapes([head.weight])):
        pytest.skip("this machine's BLAS failed the load-time check")
    x = torch.randn(40, 64)
    y = il.tiled_head(head)(x)
    for r in (0, 3, 35):
        assert torch.equal(il.tiled_head(head)(x[r : r + 1]), y[r : r + 1])
        assert torch.equal(il.tiled_head(head)(x[r : r + 5]), y[r : r + 5])
    exact = x.double() @ head.weight.double().T
    assert ((y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()).item()


def test_lm_head_in_vocabulary_blocks_equals_the_whole_float64_head():
    """The float64 head converts HEAD_BLOCK vocabulary rows at a time (bounded memory) and still
    gives each logit as one float64 dot product rounded once: the whole head's values exactly."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 3 * il.HEAD_BLOCK + 5, bias=False)
    x = torch.randn(17, 64)
    want = (x.double() @ head.weight.double().T).float()
    assert torch.equal(il.fp64_head(head)(x), want)


def test_fp8_table_lookup_gives_the_casts_bits():
    """_from_fp8 (a table lookup on CPU) returns exactly what torch's float8 cast returns, for all
    256 codes (NaN codes and signed zeros included) and in the input's shape."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        got, want = il.from_fp8(codes, dtype), codes.to(dtype)
        assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan()) and torch.equal(got.signbit(), want.signbit())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    x = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(il.from_fp8(x, torch.float32), x.float())
