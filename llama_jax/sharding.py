"""Parallelism: the device mesh (slices, data, fsdp, tensor) and the logical-axis -> mesh-axis
rules.

The model only names logical axes; this module alone decides where they live. A logical name
missing from the chosen rule table is an error, never a silent replication.

`slices` is the one axis that crosses the data-center network (DCN) between TPU slices; the
others stay on a slice's chip interconnect (ICI). Only the batch is split over it: parameters and
optimizer state are replicated across slices and sharded within each (ZeRO inside a slice), so
the one thing that crosses DCN is the gradient all-reduce, once per step. Gathering weights
over DCN every layer, as fsdp across slices would, is 10-50x slower than over ICI.
"""

import contextvars
import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slices", "data", "fsdp", "tensor")
BATCH = ("slices", "data", "fsdp")  # the batch dimension is split over every data-parallel axis

# logical name -> mesh axis (or None: replicated). Both presets name every logical axis.
# Parameters and activations share names where they share a layout (heads, mlp, vocab); the
# model dim differs: a weight's is split over fsdp (ZeRO-3), an activation's never is, since
# its batch already is. Without the activation names GSPMD is free to follow the weights'
# fsdp split into the activations, and did: the xla-attention step held the global batch's
# MLP hidden on every device (docs/distributed.md, "Activation sharding").
RULES = {
    # ZeRO-3 style: every matrix is split over fsdp along its model dim; the rest replicated
    # (over data and slices too: no rule names them but the batch).
    "fsdp": {
        "batch": BATCH, "embed": "fsdp", "vocab": None, "heads": None, "kv_heads": None,
        "head_dim": None, "mlp": None, "norm": None, "layers": None, "length": None,
        "activation_embed": None,
    },
    # fsdp plus Megatron tensor parallelism over heads, the ffn dim and the vocabulary.
    "fsdp_tp": {
        "batch": BATCH, "embed": "fsdp", "vocab": "tensor", "heads": "tensor",
        "kv_heads": "tensor", "head_dim": None, "mlp": "tensor", "norm": None, "layers": None,
        "length": None, "activation_embed": None,
    },
}


def mesh_shape(mesh_config, num_devices):
    """{'slices': 1, 'data': 1, 'fsdp': -1, 'tensor': 1} -> (1, 1, num_devices, 1); one -1 takes
    what is left; a missing axis is 1."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}: use {MESH_AXES}")
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, "
                         "with at most one -1 to fill the remaining devices")
    if -1 in sizes:
        known = -math.prod(sizes)
        if num_devices % known:
            raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} cannot fill "
                             f"{num_devices} devices: the fixed axes' product {known} must "
                             "divide the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} "
                         f"devices but {num_devices} are present: make the product match or "
                         "set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None):
    """The mesh over `devices` (default: all), also TPU compile-only devices (compile.py)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    tpu_slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(tpu_slices) not in (1, shape[0]):
        raise ValueError(f"the devices span {len(tpu_slices)} TPU slices but config.mesh.slices="
                         f"{shape[0]}: set --config.mesh.slices={len(tpu_slices)}")
    if shape[0] == 1:
        # topology-aware order on TPU (neighbouring chips share an fsdp group); a reshape elsewhere
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    elif len(tpu_slices) == shape[0]:
        # each slice's chips form the ICI part of the mesh, the slices stack along `slices`
        grid = mesh_utils.create_hybrid_device_mesh((1,) + shape[1:], (shape[0], 1, 1, 1),
                                                    devices, allow_split_physical_axes=True)
    else:
        grid = np.stack([mesh_utils.create_device_mesh(shape[1:], group,
                                                       allow_split_physical_axes=True)
                         for group in fake_slices(devices, shape[0])])
    # Auto axes: XLA propagates shardings from the parameters and the batch (GSPMD).
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def fake_slices(devices, slices):
    """Devices without a TPU slice_index (CPU, GPU) grouped into `slices` groups: whole
    processes where there are enough (a GPU node, or a local process, plays a slice), else runs
    of consecutive device ids (one process's fake CPU devices in the tests)."""
    processes = sorted({d.process_index for d in devices})
    if len(processes) == 1:
        ordered, size = sorted(devices, key=lambda d: d.id), len(devices) // slices
        return [ordered[i * size:(i + 1) * size] for i in range(slices)]
    if len(processes) % slices:
        raise ValueError(f"{len(processes)} processes cannot form config.mesh.slices={slices} "
                         "equal slices: make the process count a multiple of the slices")
    rank, per_slice = {p: i for i, p in enumerate(processes)}, len(processes) // slices
    return [[d for d in devices if rank[d.process_index] // per_slice == s]
            for s in range(slices)]


def logical_to_mesh(spec, rules):
    """A PartitionSpec of logical names -> a PartitionSpec of mesh axes."""
    mesh_axes = []
    for name in spec:
        if name is None:
            mesh_axes.append(None)
        elif name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule: add it to every preset "
                           "in llama_jax/sharding.py RULES")
        else:
            mesh_axes.append(rules[name])
    return P(*mesh_axes)


def tree_shardings(abstract_boxed_tree, mesh, rules_name):
    """Abstract tree whose leaves carry logical axes (nn.Partitioned) -> NamedSharding tree.

    Leaves without logical names (step counters, optimizer counts) are replicated.
    """
    rules = rules_for(rules_name)

    def to_sharding(path, spec, leaf):
        named = NamedSharding(mesh, logical_to_mesh(spec, rules))
        for size, axes in zip(leaf.shape, named.spec):
            parts = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else
                                                      axes or ()))
            if size % parts:
                raise ValueError(f"{jax.tree_util.keystr(path)} {leaf.shape} cannot be split "
                                 f"{parts} ways by {named.spec} on mesh {dict(mesh.shape)}: "
                                 "change the mesh or the rule preset")
        return named

    specs = nn.get_partition_spec(abstract_boxed_tree)
    leaves = nn.unbox(abstract_boxed_tree)
    return jax.tree_util.tree_map_with_path(to_sharding, specs, leaves,
                                            is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh):
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh):
    return NamedSharding(mesh, P())


# (mesh, rules) of the step being traced: set by traced_under, read by activation_spec
_ACTIVE = contextvars.ContextVar("llama_jax_sharding", default=None)


def traced_under(mesh, rules_name, fn):
    """fn, traced with `mesh` and the rule preset active, so the model's activation layouts
    (activation_spec) are decided here from logical names. jit caches a trace, so the context
    must be set inside the traced function, never around a call site."""
    rules = rules_for(rules_name)

    def traced(*args):
        token = _ACTIVE.set((mesh, rules))
        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args)
        finally:
            _ACTIVE.reset(token)
    return traced


def per_slice(fn):
    """fn traced with `slices` left out of the active rules, for a function vmapped over a
    leading slices dim with spmd_axis_name="slices": vmap adds that axis for the mapped dim,
    so the constraints inside name the others only."""
    def drop(axes):
        if axes == "slices":
            return None
        if isinstance(axes, tuple):
            return tuple(a for a in axes if a != "slices") or None
        return axes

    def traced(*args):
        mesh, rules = _ACTIVE.get()
        token = _ACTIVE.set((mesh, {name: drop(axes) for name, axes in rules.items()}))
        try:
            return fn(*args)
        finally:
            _ACTIVE.reset(token)
    return traced


def activation_spec(names):
    """(mesh, PartitionSpec) for an activation with these logical axis names in the step being
    traced, or None outside one (init, generation on a single device, tests of the layers)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return mesh, logical_to_mesh(names, rules)


def constrain(x, names):
    """x laid out by its logical axis names in the step being traced (a sharding constraint);
    unchanged outside one. The model calls this on the few activations that decide the layout."""
    placed = activation_spec(names)
    if placed is None:
        return x
    _, spec = placed
    # a bare spec means the mesh of the trace's context (traced_under), which inside by_slice's
    # shard_map is the one whose `slices` axis is manual
    return jax.lax.with_sharding_constraint(x, spec)


def rules_for(rules_name):
    if rules_name not in RULES:
        raise ValueError(f"sharding rules {rules_name!r} are unknown: use one of {sorted(RULES)}")
    return RULES[rules_name]
