"""Collective bytes counted from the compiled step's HLO, the analytic FSDP minimum they are
compared with, and the --plan table of (microbatch size, remat) candidates compiled for a TPU."""

import functools

from absl import flags
from ml_collections import config_flags

from helpers import micro_config
from llama_jax import compile as compile_lib
from llama_jax import hlo, sharding, train_step
from llama_jax.config import model_config


# What libtpu and XLA:CPU print, in small: a while loop whose trip count is only in its
# condition (libtpu), an async all-gather repeated by a continuation fusion under its channel
# id, a custom call whose config spans lines, all-reduce + dynamic-slice (libtpu's reduce-
# scatter), the three replica-group notations, a tuple all-reduce over every device, and two
# collective permutes that share a channel id in one computation (libtpu reuses them).
HLO = """HloModule test, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%scatter (input: f32[8,16]) -> f32[2,16] {
  %input = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(%input), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %two = u32[] constant(2)
  %offset = u32[] multiply(%pid, %two)
  %zero = u32[] constant(0)
  ROOT %slice = f32[2,16]{1,0} dynamic-slice(%ar, %offset, %zero), dynamic_slice_sizes={2,16}
}

%continuation (part: bf16[1,16]) -> bf16[4,16] {
  %part = bf16[1,16]{1,0} parameter(0)
  ROOT %again = bf16[4,16]{1,0} all-gather(%part), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
}

%body (p: (s32[], bf16[4,16])) -> (s32[], bf16[4,16]) {
  %p = (s32[], bf16[4,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4,16]{1,0} get-tuple-element(%p), index=1
  %kernel = bf16[4,16]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"a":
"{\\"block\\": 512}"
}}, metadata={op_name="kernel"}
  %shard = bf16[1,16]{1,0} slice(%kernel), slice={[0:1], [0:16]}
  %start = (bf16[1,16]{1,0}, bf16[4,16]{1,0}) all-gather-start(%shard), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %gathered = bf16[4,16]{1,0} all-gather-done(%start)
  %more = bf16[4,16]{1,0} fusion(%shard), kind=kCustom, calls=%continuation
  %swapped = bf16[4,16]{1,0} all-to-all(%gathered), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[4,16]{1,0}) tuple(%next, %swapped)
}

%cond (p: (s32[], bf16[4,16])) -> pred[] {
  %p = (s32[], bf16[4,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[4,16], g: f32[8,16], s: f32[4]) -> (f32[2,16], (s32[], bf16[4,16]), (f32[4], f32[])) {
  %a = bf16[4,16]{1,0} parameter(0)
  %g = f32[8,16]{1,0} parameter(1)
  %s = f32[4]{0} parameter(2)
  %zero = s32[] constant(0)
  %init = s32[] copy(%zero)
  %tuple = (s32[], bf16[4,16]{1,0}) tuple(%init, %a)
  %loop = (s32[], bf16[4,16]{1,0}) while(%tuple), condition=%cond, body=%body
  %rs = f32[2,16]{1,0} fusion(%g), kind=kCustom, calls=%scatter
  %c = f32[] constant(1)
  %norms = (f32[4]{0}, f32[]) all-reduce(%s, %c), replica_groups={}, to_apply=%add
  %send1 = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%s), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3}}
  %got1 = f32[4]{0} collective-permute-done(%send1)
  %send2 = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%got1), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3}}
  %got2 = f32[4]{0} collective-permute-done(%send2)
  ROOT %out = (f32[2,16]{1,0}, (s32[], bf16[4,16]{1,0}), (f32[4]{0}, f32[])) tuple(%rs, %loop, %norms)
}
"""


def test_collective_bytes_of_a_small_hlo_module():
    got = hlo.collective_bytes(HLO)
    assert got["loops_without_trip_count"] == 0
    assert got["executions"] == {"all-gather": 5, "all-to-all": 5, "reduce-scatter": 1,
                                 "all-reduce": 1, "collective-permute": 2}
    assert got["bytes"] == {
        "all-gather": 5 * 128 * 3 // 4,  # bf16[4,16] = 128 bytes, 3 of 4 shards received
        "all-to-all": 5 * 128 * 3 // 4,
        "reduce-scatter": 128 * 3,  # 3 partial [2, 16] float32 shards summed in
        "all-reduce": 2 * (16 + 4) * 3 // 4,  # f32[4] and f32[], ring: twice (n-1)/n
        "collective-permute": 2 * 16,  # each f32[4] received whole
    }
    assert got["total_bytes"] == sum(got["bytes"].values())


@functools.lru_cache(maxsize=None)  # each compile once for the whole file
def cpu_collectives(data, fsdp, n_layers=2, scan_layers=True):
    """(collective_bytes, fsdp_minimum_bytes, collective instructions in the HLO text) of the
    micro model's train step compiled for the 8 fake CPU devices."""
    config = micro_config(n_layers=n_layers, scan_layers=scan_layers)
    config.mesh.update(data=data, fsdp=fsdp, tensor=1)
    step = train_step.build(config, sharding.make_mesh(config.mesh))
    text = step.train_step.lower(step.abstract, step.abstract_batch()).compile().as_text()
    instructions = sum(f" {kind}(" in line for line in text.splitlines()
                       for kind in hlo.COLLECTIVES)
    return (hlo.collective_bytes(text),
            compile_lib.fsdp_minimum_bytes(step.cfg, dict(step.mesh.shape)), instructions)


def test_a_scanned_step_counts_its_loop_body_once_per_layer():
    """Pure data parallelism (data=8): the scanned model all-reduces each layer's gradients
    inside the backward while loop, one instruction run n_layers times; the unrolled model in
    one combined op. Both move exactly the gradients, 2 x 4 bytes x N x 7/8, plus scalars."""
    for n_layers in (2, 4):
        scanned, minimum, instructions = cpu_collectives(8, 1, n_layers)
        unrolled, _, _ = cpu_collectives(8, 1, n_layers, scan_layers=False)
        assert scanned["loops_without_trip_count"] == 0
        assert scanned["executions"]["all-reduce"] > instructions  # the loop body's, repeated
        assert abs(scanned["total_bytes"] / unrolled["total_bytes"] - 1) < 0.01
        params = model_config(micro_config(n_layers=n_layers)).num_params()
        assert minimum["bytes"] == {"all-reduce": round(2 * 4 * params * 7 / 8)}
        # the extra: the loss sum, token count and norms' scalar all-reduces (14 bytes)
        assert 1 <= scanned["total_bytes"] / minimum["total_bytes"] < 1.001
    # and counting the body once would have missed the extra layers' gradients
    assert cpu_collectives(8, 1, 4)[0]["total_bytes"] > 1.4 * cpu_collectives(8, 1, 2)[0][
        "total_bytes"]


def test_the_fsdp_step_on_8_devices_against_the_analytic_minimum():
    measured, minimum, _ = cpu_collectives(1, 8)
    params = model_config(micro_config()).num_params()
    # remat "none": gathered once, in the forward (float32 compute here); gradients scattered
    assert minimum["bytes"] == {"all-gather": round(4 * params * 7 / 8),
                                "reduce-scatter": round(4 * params * 7 / 8)}
    # XLA:CPU makes no reduce-scatter (it all-reduces, then slices); no activation changes
    # layout (no all-to-all: the embedding table is gathered for its lookup like any weight)
    assert set(measured["bytes"]) == {"all-gather", "all-reduce"}
    assert measured["loops_without_trip_count"] == 0
    # Measured 1.88 (XLA:CPU, jax 0.10.2; 4.17 before the activations carried sharding
    # constraints, when GSPMD split them along D like the weights and all-reduced partial sums
    # of every projection). The extra over the minimum: the gradients are all-reduced (twice a
    # reduce-scatter's bytes: 2.0 x its share) and the scanned backward gathers each layer's
    # weights again (1.76 x). A bound of 2.0 fails if activations start moving again.
    assert measured["total_bytes"] / minimum["total_bytes"] < 2.0
    # scanned and unrolled differ by that second gather (measured 1.16: all-gather 860 kB vs
    # 602 kB); the data-parallel test above is exact
    unrolled, _, _ = cpu_collectives(1, 8, scan_layers=False)
    assert set(unrolled["bytes"]) == set(measured["bytes"])
    assert 1.0 <= measured["total_bytes"] / unrolled["total_bytes"] < 1.3


def test_libtpu_loops_count_their_trip_count_from_the_condition():
    """libtpu writes no known_trip_count: it comes from the loop condition's bound. Data
    parallel over a v5e 2x2 slice, scanned and unrolled steps move exactly the gradients."""
    totals = []
    for scan_layers in (True, False):
        config = micro_config(scan_layers=scan_layers)
        config.mesh.update(data=4, fsdp=1)
        plan = compile_lib.compile_plan(config, "v5e:2x2")
        assert plan["collective_bytes_per_device"]["loops_without_trip_count"] == 0
        assert 1 <= plan["collective_ratio_to_minimum"] < 1.001
        totals.append(plan["collective_bytes_per_device"]["total_bytes"])
    assert abs(totals[0] / totals[1] - 1) < 0.01


def apply_overrides(config, overrides):
    """config with --config.* flags applied as the command line applies them."""
    argv, values = ["compile"] + overrides, flags.FlagValues()
    # the --config.* override flags are defined from the argv that will be parsed
    config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def test_plan_table_best_row_and_its_overrides_on_a_v5e_2x2_slice():
    config = micro_config()  # global batch 8 over 4 chips
    rows, table = compile_lib.run_plan(config, "v5e:2x2", sizes=(1, 2, 3, 4),
                                       remats=("full", "none"))
    # 3 and 4 per chip do not divide 8 sequences into whole microbatches over 4 chips
    assert [(r["seqs_per_chip"], r["microbatches"], r["remat"]) for r in rows] == [
        (1, 2, "full"), (2, 1, "full"), (1, 2, "none"), (2, 1, "none")]
    assert all(r["fits"] and 0 < r["gib_per_chip"] < 16 * 0.9 for r in rows)
    cfg = model_config(config)
    d, f, kv, layers, t = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_layers, 32
    full = cfg.flops_per_token(t) + 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * f + t * d)
    assert rows[0]["roofline_tokens_per_sec_per_chip"] == round(197e12 / full)
    assert rows[2]["roofline_tokens_per_sec_per_chip"] == round(197e12 / cfg.flops_per_token(t))
    best = compile_lib.best_candidate(rows)
    assert best is rows[3]  # no recompute, then the fewest microbatches
    assert len(table.splitlines()) == 1 + 1 + len(rows) + 1  # title, header, rows, best
    overrides = table.splitlines()[-1].removeprefix("best: ").split()
    assert overrides == ["--config.model.remat=none", "--config.train.microbatches=1"]
    applied = apply_overrides(micro_config(), overrides)
    assert (applied.model.remat, applied.train.microbatches) == (best["remat"],
                                                                 best["microbatches"])
    plan = compile_lib.compile_plan(applied, "v5e:2x2")
    assert plan["total_gib_per_device"] == best["gib_per_chip"]
    # libtpu writes the gradients' reduce-scatter as all-reduce + dynamic-slice: found as one
    assert "reduce-scatter" in plan["collective_bytes_per_device"]["bytes"]


def test_a_candidate_that_does_not_fit_ends_its_remat_policy():
    # 99.99% headroom: no candidate fits, so each policy stops after its first (smallest) one
    rows, table = compile_lib.run_plan(micro_config(), "v5e:2x2", sizes=(1, 2),
                                       remats=("full", "none"), headroom=0.9999)
    assert [(r["seqs_per_chip"], r["remat"], r["fits"]) for r in rows] == [
        (1, "full", False), (1, "none", False)]
    assert compile_lib.best_candidate(rows) is None
    assert table.splitlines()[-1].startswith("best: none fits")
