"""AOT machinery on small jitted functions compiled for real TPU topologies (needs libtpu: tpu-aot extra).

Checks numbers against hand counts: dense-layer FLOPs = 2*M*N*K, a scanned stack weighted by its
trip count, an all-gather's bytes = the gathered array, and an oversized argument reported as
"does not fit" naming that argument as the largest buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tracealign_jax.aot import hardware, hlo_report
from tracealign_jax.aot.compile_check import StepSpec, check_step

pytestmark = pytest.mark.skipif(not hardware.libtpu_available(), reason="libtpu missing: pip install '.[tpu-aot]'")


@pytest.fixture(scope="module")
def v5p8():
    devices = hardware.tpu_topology("v5p:2x2x2")
    return Mesh(np.asarray(devices).reshape(8), ("fsdp",))


def _sds(shape, dtype, mesh, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def test_topology_parsing_and_chip_table():
    chip, dims = hardware.parse_topology("v5p:4x4x2")
    assert chip.name == "v5p" and dims == (4, 4, 2) and hardware.num_chips("v5p:4x4x2") == 32
    assert hardware.parse_topology("v6e:4x4")[0].hbm_bytes == 32 * 10**9
    assert hardware.parse_topology("v5e:2x2")[0].hbm_bytes == 16 * 10**9
    assert hardware.parse_topology("v4:2x2x2")[0].hbm_bytes == 32 * 10**9
    with pytest.raises(ValueError, match="unknown chip"):
        hardware.parse_topology("v9z:2x2")
    with pytest.raises(ValueError, match="expected CHIP"):
        hardware.parse_topology("v5p-64")
    assert len(hardware.tpu_topology("v5p:2x2x2")) == 8


def test_dense_layer_flops_match_analytic_count(v5p8):
    m, k, n = 512, 256, 384
    x = _sds((m, k), jnp.bfloat16, v5p8, P("fsdp", None))
    w = _sds((k, n), jnp.bfloat16, v5p8, P(None, None))
    compiled = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
    costs = hlo_report.hlo_costs(compiled.as_text())
    # Rows are split over 8 devices: each device does 1/8 of the 2*M*N*K multiply-adds.
    assert costs.matmul_flops * 8 == 2 * m * n * k
    assert costs.collective_count == 0  # batch-sharded matmul with replicated weights talks to no one


@pytest.mark.parametrize(
    "equation, lhs, rhs",
    [
        ("bhqe,bhke->bhqk", (8, 8, 256, 128), (8, 8, 256, 128)),  # attention scores
        ("bqgre,bkge->bgrqk", (8, 256, 2, 4, 128), (8, 256, 2, 128)),  # grouped-query attention
    ],
)
def test_batched_matmul_flops_match_analytic_count(v5p8, equation, lhs, rhs):
    # The TPU compiler writes these as dilated, padded convolutions: counting every window position
    # would over-count; only positions that hit real input elements are multiply-adds.
    a = _sds(lhs, jnp.bfloat16, v5p8, P("fsdp"))
    b = _sds(rhs, jnp.bfloat16, v5p8, P("fsdp"))
    out_shape = jax.eval_shape(lambda x, y: jnp.einsum(equation, x, y), a, b).shape
    analytic = 2 * int(np.prod(out_shape)) * lhs[-1]
    compiled = jax.jit(lambda x, y: jnp.einsum(equation, x, y)).lower(a, b).compile()
    assert hlo_report.hlo_costs(compiled.as_text()).matmul_flops * 8 == analytic


def test_scanned_layers_weighted_by_trip_count(v5p8):
    layers, m, k = 5, 256, 512
    x = _sds((m, k), jnp.bfloat16, v5p8, P("fsdp", None))
    w = _sds((layers, k, k), jnp.bfloat16, v5p8, P())

    def loss(w_LxKxK, x_MxK):
        def body(h, w_KxK):
            return jnp.tanh(h @ w_KxK), None

        return jnp.sum(jax.lax.scan(body, x_MxK, w_LxKxK)[0].astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
    costs = hlo_report.hlo_costs(compiled.as_text())
    # forward h@w, backward dh and dw: 3 matmuls of 2*M*K*K per layer, rows split over 8 devices.
    assert costs.matmul_flops * 8 == 3 * 2 * m * k * k * layers
    assert costs.unknown_trip_loops == 0
    # XLA's own cost analysis counts each loop body once: it must be well below the weighted count.
    assert compiled.cost_analysis()["flops"] < costs.matmul_flops / 2


def test_hbm_bytes_count_one_layer_per_scan_step_and_in_place_updates_once(v5p8):
    # A layer scan reads one [K, K] slice of the [L, K, K] stack per iteration, not the whole stack L times.
    layers, m, k = 8, 256, 1024
    x = _sds((m, k), jnp.bfloat16, v5p8, P("fsdp", None))
    w = _sds((layers, k, k), jnp.bfloat16, v5p8, P())

    def forward(w_LxKxK, x_MxK):
        return jax.lax.scan(lambda h, w_KxK: (jnp.tanh(h @ w_KxK), None), x_MxK, w_LxKxK)[0]

    stack = layers * k * k * 2  # 16 MiB; counting the whole stack per iteration gave 8x that
    hbm = hlo_report.hlo_costs(jax.jit(forward).lower(w, x).compile().as_text()).hbm_bytes
    assert stack <= hbm <= 1.25 * stack, (hbm, stack)  # + the [32, 1024] activation shard's reads and writes
    # A KV-cache-style write of one row into a donated [4096, 1024] f32 buffer: the row, not the buffer.
    cache = _sds((4096, 1024), jnp.float32, v5p8, P())
    row = _sds((1, 1024), jnp.float32, v5p8, P())
    idx = _sds((), jnp.int32, v5p8, P())
    write = jax.jit(lambda c, r, i: jax.lax.dynamic_update_slice(c, r, (i, 0)), donate_argnums=0)
    hbm = hlo_report.hlo_costs(write.lower(cache, row, idx).compile().as_text()).hbm_bytes
    assert hbm <= 4 * 1024 * 4 + 64, hbm  # row read + row written (+ the index), far below 2 x 16 MiB


def test_all_gather_bytes_are_the_gathered_array(v5p8):
    x = _sds((1024, 512), jnp.float32, v5p8, P("fsdp", None))
    replicated = NamedSharding(v5p8, P())
    compiled = jax.jit(lambda a: a * 2.0, out_shardings=replicated).lower(x).compile()
    costs = hlo_report.hlo_costs(compiled.as_text())
    stats = costs.collectives
    assert stats["all-gather"].count == 1
    assert stats["all-gather"].bytes == 1024 * 512 * 4
    assert stats["all-gather"].wire_bytes == 1024 * 512 * 4 * 7 / 8  # a ring over 8 sends 7 of 8 shards
    assert sum(st.wire_bytes for st in costs.sources.values()) == costs.collective_wire_bytes


def test_hbm_bytes_and_roofline_of_a_matmul(v5p8):
    # Elementwise x*2 on a [128, 512] f32 shard per device: one read and one write of the shard.
    x = _sds((1024, 512), jnp.float32, v5p8, P("fsdp", None))
    compiled = jax.jit(lambda a: a * 2.0).lower(x).compile()
    assert hlo_report.hlo_costs(compiled.as_text()).hbm_bytes == 2 * 128 * 512 * 4
    # A [4096, 4096] x [4096, 4096] bf16 matmul, rows over 8 devices, weight columns over 8: the weight is
    # all-gathered (7/8 of 32 MiB sent per device); compute 2*M*N*K/8 at 459 TFLOP/s is the bound.
    m = 4096
    a, w = _sds((m, m), jnp.bfloat16, v5p8, P("fsdp", None)), _sds((m, m), jnp.bfloat16, v5p8, P(None, "fsdp"))
    chip = hardware.CHIPS["v5p"]
    spec = StepSpec("mm", jax.jit(lambda p, q: p @ q), (a, w), tokens=m, model_flops=2 * m**3)
    report, _ = check_step(spec, topology="v5p:2x2x2", chip=chip, num_devices=8)
    terms = report.roofline_terms
    assert terms["compute"] == pytest.approx(2 * m**3 / 8 / chip.peak_bf16_flops)
    assert terms["ICI"] == pytest.approx(m * m * 2 * 7 / 8 / chip.ici_bandwidth)
    assert terms["HBM"] == pytest.approx(report.costs.hbm_bytes / chip.hbm_bandwidth)
    assert report.bound == "compute" and report.roofline_seconds == terms["compute"]
    assert any("roofline per chip" in line and "compute-bound" in next_line
               for line, next_line in zip(report.summary_lines(), report.summary_lines()[1:]))


def test_parser_on_handwritten_hlo_with_loop_and_async_collectives():
    hlo = """HloModule m

%cond (p: (s32[], bf16[128,256])) -> pred[] {
  %p = (s32[], bf16[128,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], bf16[128,256])) -> (s32[], bf16[128,256]) {
  %p.1 = (s32[], bf16[128,256]) parameter(0)
  %x = bf16[16,256]{1,0} get-tuple-element(%p.1), index=1
  %ag = bf16[128,256]{1,0:T(8,128)(2,1)} all-gather(%x), dimensions={0}
  %ars = (f32[64]{0}, f32[64]{0}) all-reduce-start(%y, %z), to_apply=%add
  %ard = (f32[64]{0}, f32[64]{0}) all-reduce-done(%ars)
  %cps = (bf16[8,8]{1,0}, bf16[8,8]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %d = f32[128,32]{1,0} dot(%ag, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], bf16[128,256]) tuple(%i, %ag)
}

%async_rs (x.9: bf16[128,256]) -> bf16[16,256] {
  %x.9 = bf16[128,256]{1,0} parameter(0)
  ROOT %rs.2 = bf16[16,256]{1,0} reduce-scatter(%x.9), dimensions={0}, to_apply=%add
}

ENTRY %main (a: bf16[128,256]) -> bf16[128,256] {
  %a = bf16[128,256]{1,0} parameter(0)
  %w = bf16[256,32]{1,0} parameter(1)
  %loop = (s32[], bf16[128,256]) while(%init), condition=%cond, body=%body
  %as = ((bf16[128,256]), bf16[16,256]) async-start(%a), calls=%async_rs
  %ad = bf16[16,256]{1,0} async-done(%as), calls=%async_rs
  ROOT %rs = bf16[16,256]{1,0} reduce-scatter(%a), dimensions={0}, to_apply=%add
}
"""
    costs = hlo_report.hlo_costs(hlo)
    c = costs.collectives
    assert (c["all-gather"].count, c["all-gather"].bytes) == (4, 4 * 128 * 256 * 2)
    assert (c["all-reduce"].count, c["all-reduce"].bytes) == (4, 4 * 2 * 64 * 4)  # -done not double counted
    assert (c["collective-permute"].count, c["collective-permute"].bytes) == (4, 4 * 8 * 8 * 2)
    # one plain, one wrapped in async-start/-done (counted once, not once per async op)
    assert (c["reduce-scatter"].count, c["reduce-scatter"].bytes) == (2, 2 * 16 * 256 * 2)
    assert costs.matmul_flops == 4 * 2 * 128 * 32 * 256


def test_oversized_argument_does_not_fit_and_is_named_largest():
    devices = hardware.tpu_topology("v5e:2x2")
    mesh = Mesh(np.asarray(devices).reshape(4), ("fsdp",))
    # 18 GB of bf16 replicated on every 16 GB v5e chip.
    big = _sds((9 * 2**15, 2**15), jnp.bfloat16, mesh, P())
    small = _sds((8, 128), jnp.float32, mesh, P())
    spec = StepSpec(name="oversized", jitted=jax.jit(lambda w, x: (w[:8, :128] * x).sum()), args=(big, small),
                    tokens=8, model_flops=0.0)
    report, _ = check_step(spec, topology="v5e:2x2", chip=hardware.CHIPS["v5e"], num_devices=4)
    assert not report.fits
    assert report.memory.argument_bytes >= 9 * 2**30 * 2
    largest = report.buffers[0]
    assert largest.kind == "parameter" and largest.bytes >= 9 * 2**31 and "bf16[294912,32768]" in largest.shape
    text = "\n".join(report.summary_lines())
    assert "DOES NOT FIT" in text and "bf16[294912,32768]" in text


def test_an_all_gather_split_by_async_collective_fusion_counts_once():
    """TPU async collective fusion: one all-gather (channel_id=7) as a start fusion, a continuation sunk
    into a nested windowed-einsum loop (4 trips) and a done fusion, inside a 3-trip layer loop. It is
    one gather per layer step: 3 x its bytes, not 3 x (1 + 4 + 1). Another channel counts on its own."""
    hlo = """HloModule m

%inner_cond (q: (s32[], bf16[8,64])) -> pred[] {
  %q = (s32[], bf16[8,64]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %four = s32[] constant(4)
  ROOT %lt.1 = pred[] compare(%j, %four), direction=LT
}

%cont (c: bf16[8,64]) -> bf16[64,64] {
  %c = bf16[8,64]{1,0} parameter(0)
  ROOT %ag.2 = bf16[64,64]{1,0} all-gather(%c), channel_id=7, dimensions={0}, replica_groups=[1,8]<=[8]
}

%inner_body (q.1: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %q.1 = (s32[], bf16[8,64]) parameter(0)
  %s = bf16[8,64]{1,0} get-tuple-element(%q.1), index=1
  %f.2 = bf16[64,64]{1,0} fusion(%s), kind=kLoop, calls=%cont
  ROOT %t.1 = (s32[], bf16[8,64]) tuple(%j.1, %s)
}

%start (a: bf16[8,64]) -> bf16[64,64] {
  %a = bf16[8,64]{1,0} parameter(0)
  ROOT %ag.1 = bf16[64,64]{1,0} all-gather(%a), channel_id=7, dimensions={0}, replica_groups=[1,8]<=[8]
}

%done (d: bf16[8,64]) -> bf16[64,64] {
  %d = bf16[8,64]{1,0} parameter(0)
  ROOT %ag.3 = bf16[64,64]{1,0} all-gather(%d), channel_id=7, dimensions={0}, replica_groups=[1,8]<=[8]
}

%cond (p: (s32[], bf16[8,64])) -> pred[] {
  %p = (s32[], bf16[8,64]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %three), direction=LT
}

%body (p.1: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %p.1 = (s32[], bf16[8,64]) parameter(0)
  %x = bf16[8,64]{1,0} get-tuple-element(%p.1), index=1
  %f.1 = bf16[64,64]{1,0} fusion(%x), kind=kLoop, calls=%start
  %w = (s32[], bf16[8,64]) while(%p.1), condition=%inner_cond, body=%inner_body
  %f.3 = bf16[64,64]{1,0} fusion(%x), kind=kLoop, calls=%done
  %other = bf16[64,64]{1,0} all-gather(%x), channel_id=9, dimensions={0}, replica_groups=[1,8]<=[8]
  ROOT %t = (s32[], bf16[8,64]) tuple(%i.1, %x)
}

ENTRY %main (e: bf16[8,64]) -> bf16[8,64] {
  %e = bf16[8,64]{1,0} parameter(0)
  %loop = (s32[], bf16[8,64]) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[8,64]{1,0} get-tuple-element(%loop), index=1
}
"""
    c = hlo_report.hlo_costs(hlo).collectives["all-gather"]
    assert (c.count, c.bytes) == (3 + 3, (3 + 3) * 64 * 64 * 2)  # channel 7 once per layer step, channel 9 too
    assert c.wire_bytes == pytest.approx(c.bytes * 7 / 8)
