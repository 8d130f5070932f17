"""What the step moves, read from its compiled HLO: the output projection crosses once per pass,
in the compute dtype, however many loss chunks; and the compiler flag profiles (xla_flags.py)
are accepted by libtpu and make the fsdp collectives asynchronous."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import micro_config
from llama_jax import compile as compile_lib
from llama_jax import hlo, ranges, sharding, train_step, xla_flags


def compiled_text(config, devices=None):
    """The optimized HLO of the micro model's train step on `devices` (default: the 8 CPUs)."""
    step = train_step.build(config, sharding.make_mesh(config.mesh, devices))
    lowered = step.train_step.lower(step.abstract, step.abstract_batch())
    if devices is None:
        return lowered.compile().as_text()
    return compile_lib.compile_with_text(lowered, step.compiler_options)[1]


def projection_ops(text, kinds):
    """The collectives of kinds whose result holds the [D, V] = [64, 512] output projection
    (the embedding table is [V, D]: untied, the two never match)."""
    return [op for op in hlo.collective_ops(text) if op["kind"] in kinds
            and any(dims == "64,512" for _, dims in hlo._ARRAY.findall(op["type"]))]


def test_the_output_projection_moves_once_per_step_on_8_cpu_devices():
    """fsdp=8, 4 loss chunks: one gather of the projection and one sum of its gradient (an
    all-reduce on XLA:CPU, which makes no reduce-scatter). Summed inside the chunk loop the
    gradient was all-reduced once per chunk, 4 times."""
    config = micro_config()
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.train.loss_chunk_size = 8  # seq_len 32: 4 chunks
    text = compiled_text(config)
    gathers = projection_ops(text, ("all-gather",))
    sums = projection_ops(text, ("all-reduce", "reduce-scatter"))
    assert sum(op["executions"] for op in gathers) == 1
    assert sum(op["executions"] for op in sums) == 1


def test_on_a_tpu_the_projection_moves_once_in_bf16_and_the_v4_profile_overlaps_the_gathers():
    """libtpu, v4 2x2x1, fsdp=4, bfloat16 compute, 4 loss chunks: the projection is gathered
    once and its gradient reduce-scattered once, both in bf16 (before this change: 4 bf16
    gathers and 4 float32 reduce-scatters). v4's profile (on by default there) makes libtpu
    write the layers' weight gathers asynchronous; profile "none" leaves every collective
    blocking, with the same bytes."""
    _, devices = compile_lib.topology_devices("v4:2x2x1")
    config = micro_config(dtype="bfloat16", remat="full")
    config.mesh.update(data=1, fsdp=4, tensor=1)
    config.train.loss_chunk_size = 8
    text = compiled_text(config, devices)
    for kind in ("all-gather", "reduce-scatter"):
        ops = projection_ops(text, (kind,))
        assert sum(op["executions"] for op in ops) == 1, kind
        assert all(op["type"].startswith("bf16[") for op in ops), kind
    overlapped = hlo.collective_bytes(text)
    # measured: 30 of 45 collective runs asynchronous with libtpu 0.0.52, 34 of 49 with 0.0.42.1
    assert overlapped["asynchronous_executions"] > overlapped["blocking_executions"]
    config.xla.profile = "none"
    blocking = hlo.collective_bytes(compiled_text(config, devices))
    assert blocking["asynchronous_executions"] == 0
    assert blocking["total_bytes"] == overlapped["total_bytes"]  # same bytes, other schedule


@pytest.mark.parametrize("profile,topology", [("v4", "v4:2x2x1"), ("v5e", "v5e:2x2"),
                                              ("v5p", "v5p:2x2x1"), ("v6e", "v6e:2x2")])
def test_each_tpu_profile_is_accepted_by_libtpu_for_its_generation(profile, topology):
    """A sharded matmul compiled for the generation with its profile; libtpu refuses a flag it
    does not know (the last compile), so acceptance is a real check."""
    generation, devices = compile_lib.topology_devices(topology)
    assert xla_flags.generation(devices[0]) == profile == generation
    mesh = Mesh(np.array(devices), ("x",))
    split = NamedSharding(mesh, P("x"))
    matmul = jax.jit(lambda w, x: x @ w, in_shardings=(split, split), out_shardings=split)
    arg = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    lowered = matmul.lower(arg, arg)
    lowered.compile(compiler_options=xla_flags.PROFILES[profile])
    with pytest.raises(Exception, match="xla_tpu_no_such_flag"):
        lowered.compile(compiler_options={"xla_tpu_no_such_flag": True})


def test_the_gpu_profile_names_real_xla_options():
    """No GPU here: XLA:CPU, which shares XLA's option table, checks the names and value types
    (a misspelt name or a 'true' string is refused, as the last compile shows)."""
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(4))
    lowered.compile(compiler_options=xla_flags.PROFILES["gpu"])
    with pytest.raises(Exception, match="not a valid bool"):
        lowered.compile(compiler_options={"xla_gpu_enable_latency_hiding_scheduler": "true"})


def test_profiles_are_chosen_per_chip_and_overridden_by_config():
    config = micro_config()
    cpu = jax.devices()[0]
    assert xla_flags.compiler_options(config.xla, cpu) == {}  # auto on a CPU: no flags
    config.xla.profile = "v4"
    config.xla.flags = "xla_tpu_overlap_compute_collective_tc=false,xla_extra_bytes=64"
    options = xla_flags.compiler_options(config.xla, cpu)
    assert options["xla_tpu_overlap_compute_collective_tc"] is False
    assert options["xla_extra_bytes"] == 64
    assert options["xla_enable_async_all_gather"] is True  # the profile's, kept
    config.xla.flags = "async_fusion"
    with pytest.raises(ValueError, match=r"xla\.flags=.*xla_NAME=VALUE"):
        ranges.check_config(config)
