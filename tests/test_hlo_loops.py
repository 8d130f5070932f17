"""hlo.collective_bytes on the loop and gather forms libtpu writes: loops whose counter steps
by more than 1 (windowed einsums, saved from a real compile in tests/data/) and all-reduces of
zero-padded shards that stand for an all-gather."""

import pathlib

from llama_jax import hlo

DATA = pathlib.Path(__file__).parent / "data"

# A loop of 6 / 2 = 3 iterations, each moving one f32[4] (16 bytes) by collective-permute.
STEP_2 = """HloModule step2, num_partitions=2

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %moved = f32[4]{0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %two = s32[] constant(2)
  %next = s32[] add(%two, %i)
  ROOT %t = (s32[], f32[4]{0}) tuple(%next, %moved)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4]) -> (s32[], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %tuple = (s32[], f32[4]{0}) tuple(%zero, %a)
  ROOT %loop = (s32[], f32[4]{0}) while(%tuple), condition=%cond, body=%body
}
"""


def test_a_loop_stepping_by_2_counts_half_its_bound():
    got = hlo.collective_bytes(STEP_2)
    assert got["loops_without_trip_count"] == 0
    assert got["executions"] == {"collective-permute": 3}  # 6 with the old step-1 reading
    assert got["bytes"] == {"collective-permute": 3 * 16}
    # an odd bound: 0, 2, 4, 6 run, the counter then reaches 8 > 7
    odd = hlo.collective_bytes(STEP_2.replace("constant(6)", "constant(7)"))
    assert odd["executions"] == {"collective-permute": 4}


def test_a_loop_whose_step_cannot_be_read_counts_once_and_is_reported():
    # the counter is multiplied, not added to: no trip count is guessed
    got = hlo.collective_bytes(STEP_2.replace("add(%two, %i)", "multiply(%two, %i)"))
    assert got["loops_without_trip_count"] == 1
    assert got["executions"] == {"collective-permute": 1}


def test_a_saved_libtpu_windowed_einsum_loop_counts_each_permute_once_per_iteration():
    """tests/data/libtpu_windowed_einsum_loop.hlo: one collective-matmul loop (condition and
    body verbatim, metadata and fused computations left out, a minimal ENTRY) from libtpu
    0.0.42.1 compiling `python -m llama_jax.compile --config=configs/llama2_7b.py
    --topology=v5p:2x2x4 --config.data.global_batch_size=64 --config.data.seq_len=2048
    --config.model.remat=full --config.train.loss_chunk_size=512`: a wq gather fused into its
    matmul. The counter (tuple index 4) runs 0 to 8 by 2; each iteration passes 2 shards each
    way around the 16-chip ring (4 permutes of bf16[1,256,32,128], 2 MiB)."""
    got = hlo.collective_bytes((DATA / "libtpu_windowed_einsum_loop.hlo").read_text())
    assert got["loops_without_trip_count"] == 0
    assert got["executions"] == {"collective-permute": 4 * 4}  # 4 * 8 read as steps of 1
    shard = 1 * 256 * 32 * 128 * 2
    # 16 shards: about what the ring all-gather of the whole [4096, 32, 128] wq would receive
    # (15), not twice it
    assert got["bytes"] == {"collective-permute": 16 * shard}


# libtpu's form at 64 chips: each device writes its f32[2,16] shard into zeros (alone, and in a
# fusion whose zeros come in as an operand) and all-reduces the f32[8,16] buffers; a real
# all-reduce (the gradient %g) rides in the same tuple.
GATHER = """HloModule gather, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%pad (zeros: f32[8,16], shard: f32[2,16], offset: u32[]) -> f32[8,16] {
  %zeros = f32[8,16]{1,0} parameter(0)
  %shard = f32[2,16]{1,0} parameter(1)
  %offset = u32[] parameter(2)
  %zero = u32[] constant(0)
  ROOT %padded = f32[8,16]{1,0} dynamic-update-slice(%zeros, %shard, %offset, %zero)
}

ENTRY %main (w: f32[2,16], v: f32[2,16], g: f32[8,16]) -> (f32[8,16], f32[8,16], f32[8,16]) {
  %w = f32[2,16]{1,0} parameter(0)
  %v = f32[2,16]{1,0} parameter(1)
  %g = f32[8,16]{1,0} parameter(2)
  %pid = u32[] partition-id()
  %two = u32[] constant(2)
  %offset = u32[] multiply(%pid, %two)
  %zero = u32[] constant(0)
  %zero.f = f32[] constant(0)
  %zeros = f32[8,16]{1,0} broadcast(%zero.f), dimensions={}
  %padded.w = f32[8,16]{1,0} dynamic-update-slice(%zeros, %w, %offset, %zero)
  %padded.v = f32[8,16]{1,0} fusion(%zeros, %v, %offset), kind=kLoop, calls=%pad
  ROOT %sums = (f32[8,16]{1,0}, f32[8,16]{1,0}, f32[8,16]{1,0}) all-reduce(%padded.w, %padded.v, %g), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
}
"""


def test_an_all_reduce_of_zero_padded_shards_is_reported_as_a_gather():
    got = hlo.collective_bytes(GATHER)
    ring = 2 * 512 * 3 // 4  # an all-reduce of f32[8,16] (512 bytes): 2 R (n-1)/n
    # counted as what they move, under their own key: twice a ring all-gather's 512 * 3/4
    assert got["bytes"] == {hlo.GATHER_ALL_REDUCE: 2 * ring, "all-reduce": ring}
    assert got["executions"] == {hlo.GATHER_ALL_REDUCE: 1, "all-reduce": 1}
    assert got["total_bytes"] == 3 * ring
    # a shard padded into ones is a sum, not a gather
    ones = hlo.collective_bytes(GATHER.replace("%zero.f = f32[] constant(0)",
                                               "%zero.f = f32[] constant(1)"))
    assert ones["bytes"] == {"all-reduce": 3 * ring}
