"""The room for how a step runs: parallel.py owns the layer runner, accumulation and the slice
split; sharding.py's AXES table is the one place a mesh axis is named; building a step imports
no TensorFlow."""

import io
import subprocess
import sys
import tokenize

import jax
import pytest

from helpers import ROOT, micro_config
from llama_jax import compile as compile_lib, parallel, ranges, sharding, train_step
from llama_jax.config import model_config
from llama_jax.model import Llama


def test_building_or_compiling_a_step_imports_no_tensorflow():
    code = ("import sys, llama_jax.train_step, llama_jax.compile; "
            "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("module", ["model", "train_step", "parallel", "checkpoint", "compile",
                                    "config", "attention", "ranges"])
def test_no_module_but_sharding_spells_a_mesh_axis(module):
    source = (ROOT / "llama_jax" / f"{module}.py").read_text()
    strings = [t.string.strip("'\"") for t in tokenize.generate_tokens(io.StringIO(source).readline)
               if t.type == tokenize.STRING]
    assert [s for s in strings if s in sharding.MESH_AXES] == []


def test_the_axes_table_drives_the_mesh_the_batch_and_the_ranges():
    assert sharding.MESH_AXES == tuple(a.name for a in sharding.AXES)
    assert sharding.BATCH == tuple(a.name for a in sharding.AXES if a.batch)
    assert sharding.DCN == (sharding.SLICES,)
    # every axis is a setting whose range and meaning come from its row
    for axis in sharding.AXES:
        check = ranges.CONFIG[f"mesh.{axis.name}"]
        assert check.fix == axis.doc
        assert check.problem("k", -1) is None or axis.network == "dcn"  # only ICI axes fill
    mesh = sharding.make_mesh({sharding.SLICES: 2, sharding.FSDP: 2, sharding.TENSOR: 2})
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"slices": 2, "data": 1, "fsdp": 2, "context": 1, "tensor": 2}
    # each slice is one block of devices: slice s holds devices 4s .. 4s + 3
    assert [sorted(d.id for d in mesh.devices[s].flat) for s in range(2)] == [[0, 1, 2, 3],
                                                                              [4, 5, 6, 7]]
    assert sharding.weight_axes("embed") == (sharding.FSDP, sharding.CONTEXT)
    assert sharding.weight_axes("heads") == (sharding.TENSOR,)


def test_fsdp_minimum_reads_the_splits_from_the_table():
    cfg = model_config(micro_config())
    n = cfg.num_params() * 4  # float32 compute in micro_config
    plain = compile_lib.fsdp_minimum_bytes(cfg, {"fsdp": 4})
    assert plain["bytes"] == {"all-gather": round(n * 3 / 4), "reduce-scatter": round(n * 3 / 4)}
    sliced = compile_lib.fsdp_minimum_bytes(cfg, {"slices": 2, "data": 2, "fsdp": 2})
    assert sliced["bytes"]["all-reduce"] == round(2 * n / 2 * 3 / 4)  # 4 replicas of each shard
    assert sliced["dcn_bytes"] == round(2 * 4 * cfg.num_params() / 4 * 1 / 2)


def test_the_plan_and_the_layer_runner_come_from_the_config():
    config = micro_config(remat="full")
    config.mesh.update(slices=2, fsdp=4)
    config.train.microbatches, config.data.global_batch_size = 2, 16
    step = train_step.build(config, sharding.make_mesh(config.mesh))
    assert (step.plan.slices, step.plan.microbatches) == (2, 2)
    assert step.model.layer_stack is not None  # remat full under scan: parallel.remat_layers
    assert parallel.layer_stack(model_config(micro_config(remat="none"))) is None
    assert parallel.Plan(mesh=None).slices == 1
    # the model alone (init, generation) runs its plain stack: the same parameters either way
    cfg = step.cfg
    shapes = [jax.eval_shape(lambda: Llama(cfg, layer_stack=stack).init(
        jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))) for stack in
        (None, parallel.layer_stack(cfg))]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
