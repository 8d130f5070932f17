"""Parallelism: the device mesh (slices, data, fsdp, context, tensor) and the logical-axis ->
mesh-axis rules.

The model only names logical axes; this module alone decides where they live. A logical name
missing from the chosen rule table is an error, never a silent replication. The mesh axes are one
table (AXES): every other module reads their names, networks and roles from it.
"""

import contextvars
import dataclasses
import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Axis:
    name: str
    network: str  # "dcn": crosses the data-center network between TPU slices; "ici": a slice's own
    batch: bool  # the global batch is split over it
    doc: str  # what it is for, as ranges.py prints it when its value is out of range


# Mesh order is table order: the DCN axis outermost, so each slice is a contiguous block.
AXES = (
    # Only the batch is split over slices: parameters and optimizer state are replicated across
    # slices and sharded within each (ZeRO inside a slice), so the one thing that crosses DCN is
    # the gradient all-reduce, once per step. Gathering weights over DCN every layer, as fsdp
    # across slices would, is 10-50x slower than over ICI.
    Axis("slices", "dcn", True, "TPU slices joined by the data-center network, data-parallel "
         "across them; 1 = one slice"),
    Axis("data", "ici", True, "pure data parallelism: parameters replicated over it"),
    Axis("fsdp", "ici", True, "ZeRO-3: the batch and every weight's model dim split over it"),
    # Context parallelism: every activation's sequence dim is split over it (queries stay split
    # inside attention, keys and values are gathered), so one sequence spreads over several
    # chips; its ranks also shard the weights and optimizer state with fsdp's (ZeRO over both)
    Axis("context", "ici", False, "context parallelism: each sequence split over it (seq_len "
         "a multiple of 2 x context), the weights too"),
    Axis("tensor", "ici", False, "Megatron tensor parallelism over heads, ffn and vocabulary "
         "(the fsdp_tp rules)"),
)
MESH_AXES = tuple(a.name for a in AXES)
BATCH = tuple(a.name for a in AXES if a.batch)  # the batch dimension is split over these
DCN = tuple(a.name for a in AXES if a.network == "dcn")
SLICES, DATA, FSDP, CONTEXT, TENSOR = MESH_AXES  # for the rules below and parallel.by_slice
# base_config's mesh, also where inference puts the parameters (parallel.place): the fsdp axis
# takes every device, the others are 1
DEFAULT_MESH = {**{axis: 1 for axis in MESH_AXES}, FSDP: -1}
DEFAULT_RULES = "fsdp"  # a preset of RULES below

# logical name -> mesh axis (or None: replicated). Both presets name every logical axis.
# Parameters and activations share names where they share a layout (heads, mlp, vocab); the
# model dim differs: a weight's is split over fsdp (ZeRO-3), an activation's never is, since
# its batch already is. Without the activation names GSPMD is free to follow the weights'
# fsdp split into the activations, and did: the xla-attention step held the global batch's
# MLP hidden on every device (docs/distributed.md, "Activation sharding"). An activation's
# sequence dim ("length") is split over context; a weight's model dim over fsdp and context
# together, so context ranks hold no more of the weights than fsdp ranks do.
RULES = {
    # ZeRO-3 style: every matrix is split over fsdp along its model dim; the rest replicated
    # (over data and slices too: no rule names them but the batch).
    "fsdp": {
        "batch": BATCH, "embed": (FSDP, CONTEXT), "vocab": None, "heads": None,
        "kv_heads": None, "head_dim": None, "mlp": None, "norm": None, "layers": None,
        "length": CONTEXT,
        "activation_embed": None,
    },
    # fsdp plus Megatron tensor parallelism over heads, the ffn dim and the vocabulary.
    "fsdp_tp": {
        "batch": BATCH, "embed": (FSDP, CONTEXT), "vocab": TENSOR, "heads": TENSOR,
        "kv_heads": TENSOR, "head_dim": None, "mlp": TENSOR, "norm": None, "layers": None,
        "length": CONTEXT, "activation_embed": None,
    },
}


def mesh_shape(mesh_config, num_devices):
    """{'slices': 1, 'data': 1, 'fsdp': -1, 'context': 1, 'tensor': 1} -> (1, 1, num_devices,
    1, 1); one -1 takes what is left; a missing axis is 1."""
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


def size_of(sizes, axes):
    """The devices a dimension split over `axes` (a name, a tuple of names or None) is split
    across, for sizes {axis name: size} (a mesh's shape; a missing axis is 1)."""
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(sizes.get(a, 1) for a in axes)


def weight_axes(logical):
    """The mesh axes some rule preset splits a logical parameter axis over, e.g. 'embed' ->
    ('fsdp',), 'heads' -> ('tensor',): the sizes a model's dims must divide."""
    found = []
    for rules in RULES.values():
        axes = rules[logical]
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            if axis not in found:
                found.append(axis)
    return tuple(found)


def make_mesh(mesh_config, devices=None):
    """The mesh over `devices` (default: all), also TPU compile-only devices (compile.py)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    sizes = dict(zip(MESH_AXES, shape))
    slices = size_of(sizes, DCN)
    tpu_slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(tpu_slices) not in (1, slices):
        raise ValueError(f"the devices span {len(tpu_slices)} TPU slices but config.mesh.{SLICES}="
                         f"{slices}: set --config.mesh.{SLICES}={len(tpu_slices)}")
    # each slice's part of the mesh: the ICI axes, the DCN ones 1
    ici = tuple(1 if a.network == "dcn" else sizes[a.name] for a in AXES)
    if slices == 1:
        # topology-aware order on TPU (neighbouring chips share an fsdp group); a reshape elsewhere
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    elif len(tpu_slices) == slices:
        # each slice's chips form the ICI part of the mesh, the slices stack along the DCN axes
        dcn = tuple(sizes[a.name] if a.network == "dcn" else 1 for a in AXES)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                    allow_split_physical_axes=True)
    else:
        within = tuple(sizes[a.name] for a in AXES if a.network == "ici")
        grid = np.stack([mesh_utils.create_device_mesh(within, group,
                                                       allow_split_physical_axes=True)
                         for group in fake_slices(devices, slices)]).reshape(shape)
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
    """Every batch entry is [B, T]: rows over the batch axes, each row's tokens over context."""
    return NamedSharding(mesh, P(BATCH, CONTEXT))


@dataclasses.dataclass(frozen=True)
class Reader:
    """How this process reads a global batch. Processes whose devices hold the same rows (a
    context group spanning hosts: context 8 on v5p's 4 chips a host) read identical data, as one
    reader; its first process alone saves the stream's position."""
    rows: np.ndarray  # the global batch rows it loads (whole), all its devices' parts of them
    index: int  # which reader: a data stream's shards are split among readers, not processes
    count: int
    saves: bool


def batch_readers(mesh, global_batch_size, seq_len, process_of=lambda d: d.process_index):
    """{process index: its Reader} for [global_batch_size, seq_len] batches on `mesh`; a run
    takes its own, [jax.process_index()] (process_of lets a test give one process's fake devices
    to several processes)."""
    held = {}
    for device, index in batch_sharding(mesh).devices_indices_map(
            (global_batch_size, seq_len)).items():
        held.setdefault(process_of(device), set()).update(range(*index[0].indices(
            global_batch_size)))
    groups = {}  # (first row, end row) -> the processes holding exactly those rows
    for process, rows in sorted(held.items()):
        span = (min(rows), max(rows) + 1)
        if len(rows) != span[1] - span[0]:
            raise ValueError(f"process {process}'s devices hold batch rows {sorted(rows)}, not "
                             "one range: order the mesh's devices by process")
        groups.setdefault(span, []).append(process)
    spans = sorted(groups)
    if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])):
        raise ValueError(f"processes hold overlapping batch rows {spans}: order the mesh's "
                         "devices by process")
    return {process: Reader(np.arange(*span), i, len(spans), process == groups[span][0])
            for i, span in enumerate(spans) for process in groups[span]}


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
    """fn traced with the DCN axes left out of the active rules, for a function that runs
    inside a shard_map manual over them (parallel.by_slice): there those axes are no longer
    the compiler's to place, so the constraints inside name the others only."""
    def drop(axes):
        if axes in DCN:
            return None
        if isinstance(axes, tuple):
            return tuple(a for a in axes if a not in DCN) or None
        return axes

    def traced(*args):
        mesh, rules = _ACTIVE.get()
        token = _ACTIVE.set((mesh, {name: drop(axes) for name, axes in rules.items()}))
        try:
            return fn(*args)
        finally:
            _ACTIVE.reset(token)
    return traced


def traced_platform():
    """The platform the step being traced compiles for ("cpu", "gpu", "tpu": an AOT compile for
    a TPU topology on a CPU host says "tpu"); outside a step, the default backend's."""
    active = _ACTIVE.get()
    if active is None:
        return jax.default_backend()
    return active[0].devices.flat[0].platform


def activation_spec(names):
    """(mesh, PartitionSpec) for an activation with these logical axis names in the step being
    traced, or None outside one (init, generation on a single device, tests of the layers)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return mesh, logical_to_mesh(names, rules)


def parts(name):
    """How many pieces the step being traced splits a logical axis into (1 outside a step):
    "length" > 1 means the tokens are split over context, so in load-balanced order."""
    placed = activation_spec((name,))
    return 1 if placed is None else size_of(dict(placed[0].shape), placed[1][0])


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
