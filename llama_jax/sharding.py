"""Parallelism: the device mesh (data, fsdp, tensor) and the logical-axis -> mesh-axis rules.

The model only names logical axes; this module alone decides where they live. A logical name
missing from the chosen rule table is an error, never a silent replication.
"""

import contextvars
import math

import jax
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# logical name -> mesh axis (or None: replicated). Both presets name every logical axis.
# Parameters and activations share names where they share a layout (heads, mlp, vocab); the
# model dim differs: a weight's is split over fsdp (ZeRO-3), an activation's never is, since
# its batch already is. Without the activation names GSPMD is free to follow the weights'
# fsdp split into the activations, and did: the xla-attention step held the global batch's
# MLP hidden on every device (docs/distributed.md, "Activation sharding").
RULES = {
    # ZeRO-3 style: every matrix is split over fsdp along its model dim; the rest replicated.
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
    """{'data': 1, 'fsdp': -1, 'tensor': 1} -> (1, num_devices, 1); one -1 takes what is left."""
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
    # topology-aware order on TPU (neighbouring chips share an fsdp group); a reshape elsewhere
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    # Auto axes: XLA propagates shardings from the parameters and the batch (GSPMD).
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
    mesh, spec = placed
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def rules_for(rules_name):
    if rules_name not in RULES:
        raise ValueError(f"sharding rules {rules_name!r} are unknown: use one of {sorted(RULES)}")
    return RULES[rules_name]
