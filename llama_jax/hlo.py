"""Collective bytes: what a compiled step moves between devices, read from its HLO text
(`compiled.as_text()`), for XLA:CPU and libtpu alike. compile.py reports it beside the FSDP
minimum; tests check the sharding's traffic with it.
"""

import collections
import dataclasses
import functools
import math
import re

import numpy as np


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# the kind collective_bytes reports an all-reduce of zero-padded shards under: a gather in effect
GATHER_ALL_REDUCE = "all-reduce (gather)"
# bits per element of the HLO dtypes (the f8 variants are matched by prefix)
_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
               "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
               "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# a send that crosses slices: _xla_megascale_transfer_type="ALL_REDUCE" and
# _xla_megascale_target="{1,2}x{0:3}", the slices ({1,2}) and the devices in each ({0:3})
_MEGASCALE_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_SLICES = re.compile(r'_xla_megascale_target="\{([\d,]+)\}')
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)="
                     r"%?([\w.\-]+)")


@dataclasses.dataclass
class _Instruction:
    name: str
    type: str  # the result type: 'f32[8,32]{1,0}' or a tuple '(f32[2], bf16[4,4])'
    op: str
    operands: list
    attrs: str  # everything after the operand list
    root: bool


def _element_bytes(type_text):
    """Bytes of each array in a type: one for an array, one per element for a tuple."""
    sizes = []
    for dtype, dims in _ARRAY.findall(type_text):
        bits = 8 if dtype.startswith("f8") else _DTYPE_BITS.get(dtype)
        if bits is None:
            raise ValueError(f"unknown HLO dtype {dtype!r} in {type_text[:80]!r}")
        sizes.append(math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d) * bits // 8)
    return sizes


def _type_bytes(type_text):
    return sum(_element_bytes(type_text))


def _closing(text, start):
    """Index just past the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start:start + 80]!r}")


def _parse_instruction(line):
    # libtpu numbers long operand lists: `a, /*index=5*/%b`
    match = _INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))
    if not match:
        return None
    root, name, rest = match.groups()
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    op = rest[:rest.index("(")]
    close = _closing(rest, len(op))
    operands = [o.split()[-1].lstrip("%") for o in re.split(r",\s*(?![^(\[{]*[)\]}])",
                                                             rest[len(op) + 1:close - 1]) if o]
    return _Instruction(name, type_text, op, operands, rest[close:], bool(root))


def _parse_module(hlo_text):
    """{computation: [instructions]}, the entry computation's name, the module's device count."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.rstrip() == "}":  # a custom call's config may span lines, some starting "}"
            current = None
        elif current is not None and (instruction := _parse_instruction(line)):
            current.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text: pass compiled.as_text()")
    partitions = re.search(r"num_partitions=(\d+)", hlo_text)
    replicas = re.search(r"replica_count=(\d+)", hlo_text)
    devices = int(partitions.group(1) if partitions else 1) * int(
        replicas.group(1) if replicas else 1)
    return computations, entry, devices


def _unwrap(instruction, by_name):
    """instruction, or what it copies: libtpu puts copies and bitcasts on loop counters."""
    while instruction is not None and instruction.op in (
            "copy", "copy-start", "copy-done", "bitcast", "convert"):
        instruction = by_name.get(instruction.operands[0])
    return instruction


def _constant(instruction, by_name):
    """The integer a (copied) constant holds, else None."""
    instruction = _unwrap(instruction, by_name)
    return int(instruction.operands[0]) if instruction and instruction.op == "constant" else None


def _step(body, index):
    """What a loop body adds to tuple element `index` each iteration: the root tuple's element
    `index` is add(get-tuple-element(param, index), constant(S)) in either order; else None."""
    by_name = {i.name: i for i in body}
    root = next(i for i in body if i.root)
    if root.op != "tuple" or index >= len(root.operands):
        return None
    add = _unwrap(by_name.get(root.operands[index]), by_name)
    if add is None or add.op != "add" or len(add.operands) != 2:
        return None
    for counter, step in (add.operands, add.operands[::-1]):
        counter = _unwrap(by_name.get(counter), by_name)
        if (counter is not None and counter.op == "get-tuple-element"
                and re.search(r"index=(\d+)", counter.attrs).group(1) == str(index)):
            return _constant(by_name.get(step), by_name)
    return None


def _trip_count(loop, caller, computations):
    """Iterations of a while loop, or None. XLA:CPU writes known_trip_count in the while's
    backend_config; libtpu does not, so there it is read from the condition, which for a JAX
    scan is `ROOT compare(get-tuple-element(param, index=k), constant(N)), direction=LT`
    (or LE, GT or GE with the bound on the left), with the counter k starting at a constant in
    the loop's init tuple and stepping by the constant the body adds to it: 1 for a scan, 2 (or
    more) in libtpu's windowed-einsum (collective matmul) loops, which do two shards' work per
    iteration."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    condition = computations[re.search(r"condition=%?([\w.\-]+)", loop.attrs).group(1)]
    body = computations[re.search(r"body=%?([\w.\-]+)", loop.attrs).group(1)]
    by_name = {i.name: i for i in condition}
    root = next(i for i in condition if i.root)
    direction = re.search(r"direction=(\w+)", root.attrs)
    if root.op != "compare" or len(root.operands) != 2 or direction is None:
        return None
    lhs, rhs = (_unwrap(by_name.get(o), by_name) for o in root.operands)
    # written as counter OP bound; a bound on the left flips the comparison
    flip = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}
    direction = direction.group(1)
    if lhs is not None and lhs.op != "get-tuple-element":
        lhs, rhs, direction = rhs, lhs, flip.get(direction, direction)
    bound = _constant(rhs, by_name)
    if lhs is None or lhs.op != "get-tuple-element" or bound is None or direction not in (
            "LT", "LE"):
        return None
    index = int(re.search(r"index=(\d+)", lhs.attrs).group(1))
    in_caller = {i.name: i for i in caller}
    init_tuple = in_caller.get(loop.operands[0])
    if init_tuple is None or init_tuple.op != "tuple":
        return None
    start = _constant(in_caller.get(init_tuple.operands[index]), in_caller)
    step = _step(body, index)
    if start is None or step is None or step <= 0:
        return None
    # ceil: the counter may pass the bound (0, 2, 4, 6 < 7)
    return max(0, -(-(bound - start + (direction == "LE")) // step))


def _iota(spec):
    """'[2,4]T(1,0)' or '[8]' (an iota tile assignment) -> the flat device ids it lists."""
    dims = [int(d) for d in re.match(r"\[([\d,]+)\]", spec).group(1).split(",")]
    perm = re.search(r"T\(([\d,]+)\)", spec)
    ids = np.arange(math.prod(dims)).reshape(dims)
    return (ids.transpose([int(p) for p in perm.group(1).split(",")]) if perm else ids).ravel()


def _groups(instruction, devices):
    """The device groups of a collective, as lists of the partition ids the HLO names (a
    collective-permute's groups are its source-target pairs)."""
    attrs = instruction.attrs
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?"
                     r"\s*\{([^}]*)\}", attrs)
    if mesh:  # mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}: along axis_0
        names_sizes = re.findall(r"'(\w+)'=(\d+)", mesh.group(1))
        names, sizes = [n for n, _ in names_sizes], [int(k) for _, k in names_sizes]
        ids_spec = mesh.group(2)
        ids = (np.arange(math.prod(sizes)) if not ids_spec else _iota(ids_spec)
               if ids_spec.startswith("[") else np.array([int(i) for i in ids_spec.split(",")]))
        along = [names.index(a) for a in re.findall(r"'(\w+)'", mesh.group(3))]
        rest = [i for i in range(len(sizes)) if i not in along]
        grid = ids.reshape(sizes).transpose(rest + along)
        return grid.reshape(-1, math.prod(sizes[i] for i in along)).tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if iota:  # [groups, size]<=[devices]
        return _iota(iota.group(3)).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    listed = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{}]*\})\}", attrs)
    if listed:
        return [[int(i) for i in g.split(",")] for g in re.findall(r"\{([\d,]+)\}",
                                                                  listed.group(1))]
    return [list(range(devices))]  # replica_groups={}: one group of every device


def _scattered(all_reduce, computation, n):
    """Bytes of the 1/n slice when all_reduce's one use is a dynamic-slice to its 1/n, else None:
    libtpu writes its reduce-scatters so (a fusion of all-reduce, dynamic-slice whose emitter
    sends only the slices), and the pair is a reduce-scatter wherever it appears."""
    users = [i for i in computation if all_reduce.name in i.operands]
    if len(users) != 1 or users[0].op != "dynamic-slice":
        return None
    shard = _type_bytes(users[0].type)
    return shard if shard * n == _type_bytes(all_reduce.type) else None


def _zero_padded(instruction, by_name, computations, n):
    """Whether instruction is a 1/n shard written into zeros, dynamic-update-slice(
    broadcast(constant(0)), shard, offsets), alone or fused, through copies: libtpu's operand
    for an all-reduce that gathers (it writes fsdp weight gathers so at fsdp=64)."""
    update_by_name = base_by_name = by_name
    padded = _unwrap(instruction, by_name)
    if padded is not None and padded.op == "fusion":
        fused = computations.get(re.search(r"calls=%?([\w.\-]+)", padded.attrs).group(1), [])
        fusion, update_by_name = padded, {i.name: i for i in fused}
        padded, base_by_name = next((i for i in fused if i.root), None), update_by_name
    if padded is None or padded.op != "dynamic-update-slice":
        return False
    base = _unwrap(base_by_name.get(padded.operands[0]), base_by_name)
    if base is not None and base.op == "parameter" and base_by_name is not by_name:
        # the zeros come into the fusion as its operand
        base = _unwrap(by_name.get(fusion.operands[int(base.operands[0])]), by_name)
        base_by_name = by_name
    if base is not None and base.op == "broadcast":
        base = _unwrap(base_by_name.get(base.operands[0]), base_by_name)
    update = update_by_name.get(padded.operands[1])
    return (base is not None and base.op == "constant"
            and re.fullmatch(r"-?0(\.0*)?", base.operands[0]) is not None
            and update is not None
            and _type_bytes(update.type) * n == _type_bytes(padded.type))


def _moved(kind, size, n, slices):
    """Bytes one device receives through a collective of `kind` over n devices with a result of
    `size` bytes, counting only what crosses between `slices` groups of n/slices (1: all of
    it) when the op combines within each group first; see collective_bytes."""
    per_slice = n // slices
    if kind == "reduce-scatter":  # summed within the slice first: 1/per_slice of the operand
        return size * n / per_slice * (slices - 1) / slices if slices > 1 else size * (n - 1)
    if kind == "all-to-all":  # nothing to combine: the other slices' share goes as it is
        return size * ((n - per_slice) / n if slices > 1 else (n - 1) / n)
    if kind == "collective-permute":
        return size
    share = size / per_slice if slices > 1 else size  # each device carries 1/per_slice of it
    parts = slices if slices > 1 else n
    return (2 if kind == "all-reduce" else 1) * share * (parts - 1) / parts


def _megascale_send(send):
    """(kind, bytes over DCN) of libtpu's cross-slice collective, a host-transfer send of this
    device's part to the other slices run by the multi-slice (megascale) runtime; else None."""
    transfer = _MEGASCALE_TYPE.search(send.attrs)
    if transfer is None:
        return None
    kind = transfer.group(1).lower().replace("_", "-")
    slices = len(_MEGASCALE_SLICES.search(send.attrs).group(1).split(","))
    return kind, _moved(kind, _type_bytes(_ARRAY.search(send.type).group(0)), slices, slices)


def _execution_counts(computations, entry):
    """(computation name -> times it runs per step, loops whose trip count is unknown)."""
    callers, unknown_loops = {}, 0  # callee -> [(caller, runs per caller run)]
    for name, instructions in computations.items():
        for instruction in instructions:
            if instruction.op in ("async-done", "async-update"):
                continue  # they name the same wrapped computation as their async-start
            trips = 1
            if instruction.op == "while":
                trips = _trip_count(instruction, instructions, computations)
                unknown_loops += trips is None
                trips = 1 if trips is None else trips
            called = _CALLEE.findall(instruction.attrs)
            branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attrs)
            called += [("branch", b.strip().lstrip("%")) for b in
                       (branches.group(1).split(",") if branches else [])]
            for key, callee in called:
                times = trips if key == "body" else trips + 1 if key == "condition" else 1
                callers.setdefault(callee, []).append((name, times))

    @functools.lru_cache(maxsize=None)
    def executions(name):
        if name == entry:
            return 1
        return sum(executions(caller) * times for caller, times in callers.get(name, ()))
    return executions, unknown_loops


def collective_bytes(hlo_text, slice_size=None):
    """Bytes one device receives per step through each kind of collective, from the compiled
    HLO text (`compiled.as_text()`), counted as the bandwidth-optimal (ring) algorithms move
    them. With R the bytes of the op's result on one device and n the devices in its group:

      all-gather          R (n-1)/n    it receives the n-1 shards it lacks
      reduce-scatter      R (n-1)      = operand bytes (n-1)/n: n-1 partial shards summed in
      all-reduce          2 R (n-1)/n  a reduce-scatter then an all-gather
      all-to-all          R (n-1)/n    it keeps its own 1/n
      collective-permute  R            one whole buffer from its source

    Tuple results (several arrays in one op) count every array. An op inside a while loop's
    body counts once per iteration (nested loops multiply); the trip count comes from the
    loop (see _trip_count), and a loop whose count cannot be read counts once and is reported
    in `loops_without_trip_count`. Async pairs count once (the -done, which carries the
    result; -start is skipped), and libtpu's async collective fusions, which repeat one
    collective in a start and several continuation fusions under one channel_id, count once
    (ops of one channel within one computation stay distinct: libtpu reuses channel ids).
    An all-reduce whose one use is a dynamic-slice to its 1/n is a reduce-scatter (that is how
    libtpu writes them). An all-reduce of zero-padded shards (each device's 1/n written into
    zeros by a dynamic-update-slice, as libtpu writes weight gathers at fsdp=64) is a
    gather in effect: it counts as the all-reduce it is, twice a ring all-gather's bytes, under
    the kind GATHER_ALL_REDUCE, so the reader can tell it from a sum (a tuple all-reduce that
    mixes both splits its bytes by size). Both branches of a conditional count (an upper
    bound; a train step has none).

    With `slice_size` (devices per slice of a multi-slice mesh), the bytes that cross the
    data-center network are counted apart in "dcn_bytes", for every op whose groups join devices
    of s > 1 slices: what the op must send between slices when it first combines what it can
    within each slice over ICI (n/s devices there), i.e. the formulas above for a group of s
    holding 1/(n/s) of the data each. An op over the slices axis alone (n = s) counts as above.

    Returns {"bytes": {kind: bytes}, "executions": {kind: ops executed}, "total_bytes",
    "dcn_bytes": {kind: bytes}, "dcn_total_bytes", "asynchronous_executions" and
    "asynchronous_bytes" (ops compute can overlap, see collective_ops), "blocking_executions"
    and "blocking_bytes", "loops_without_trip_count"}, kinds in COLLECTIVES (and
    GATHER_ALL_REDUCE) that occur.
    """
    ops = collective_ops(hlo_text, slice_size)
    result = {"bytes": {}, "executions": {}, "dcn_bytes": {}}
    for op in ops:
        # an all-reduce's bytes are linear in its size: split them by the gathering fraction
        for part_kind, share in ((GATHER_ALL_REDUCE, op["gathered"]),
                                 (op["kind"], 1 - op["gathered"])):
            if share <= 0:
                continue
            result["bytes"][part_kind] = (result["bytes"].get(part_kind, 0)
                                          + round(op["bytes"] * share * op["executions"]))
            result["executions"][part_kind] = (result["executions"].get(part_kind, 0)
                                               + op["executions"])
            if op["dcn_bytes"]:
                result["dcn_bytes"][part_kind] = (result["dcn_bytes"].get(part_kind, 0) + round(
                    op["dcn_bytes"] * share * op["executions"]))
    result["total_bytes"] = sum(result["bytes"].values())
    result["dcn_total_bytes"] = sum(result["dcn_bytes"].values())
    # how much of it compute can hide: asynchronous ops (see collective_ops) vs blocking ones
    for mode, wanted in (("asynchronous", True), ("blocking", False)):
        mine = [op for op in ops if op["asynchronous"] == wanted]
        result[f"{mode}_executions"] = sum(op["executions"] for op in mine)
        result[f"{mode}_bytes"] = sum(round(op["bytes"] * op["executions"]) for op in mine)
    result["loops_without_trip_count"] = ops.unknown_loops
    return result


class _Ops(list):
    unknown_loops = 0  # loops whose trip count could not be read (each counted once)


def _async_computations(computations):
    """Computations whose collectives run asynchronously: those an async-start wraps (XLA's
    generic async ops) and libtpu's async collective fusions (which its
    xla_tpu_enable_async_collective_fusion flags create), named async_collective_fusion.N."""
    wrapped = {callee for instructions in computations.values() for i in instructions
               if i.op == "async-start" for _, callee in _CALLEE.findall(i.attrs)}
    return wrapped | {name for name in computations if name.startswith("async_collective_fusion")}


def collective_ops(hlo_text, slice_size=None):
    """One dict per collective of the step, as collective_bytes counts them (it sums these):
    kind, the computation and instruction it is in, its result `type`, the `bytes` one device
    receives per run, its `executions` per step, the share of those bytes that cross the
    data-center network per run (`dcn_bytes`), the fraction of an all-reduce that gathers
    zero-padded shards (`gathered`), and whether it is `asynchronous`: split into a start and
    a done (compute can run between them), inside an async wrapper or libtpu's async collective
    fusion, or the start of one (its async_collective_name attribute); else it blocks the
    computation that issues it. The list's `unknown_loops`: loops counted once."""
    computations, entry, devices = _parse_module(hlo_text)
    executions, unknown_loops = _execution_counts(computations, entry)
    in_async = _async_computations(computations)
    found = {}  # (kind, channel, occurrence) or (computation, name) -> op
    for name, instructions in computations.items():
        by_name, seen = {i.name: i for i in instructions}, collections.Counter()
        for instruction in instructions:
            kind = instruction.op.removesuffix("-done")
            if kind == "send" and (sent := _megascale_send(instruction)) and executions(name):
                found[(name, instruction.name)] = {
                    "kind": sent[0], "computation": name, "name": instruction.name,
                    "type": instruction.type, "bytes": sent[1], "executions": executions(name),
                    "dcn_bytes": sent[1], "gathered": 0, "asynchronous": True}
                continue
            if kind not in COLLECTIVES or not executions(name):
                continue
            # a -done has the result; its -start has the replica groups and the channel
            start = by_name.get(instruction.operands[0]) if instruction.op != kind else None
            source = start or instruction
            groups = _groups(source, devices)
            size, n = _type_bytes(instruction.type), len(groups[0])
            gathered = 0  # the part of an all-reduce that gathers zero-padded shards
            if kind == "all-reduce" and (shard := _scattered(instruction, instructions, n)):
                kind, size = "reduce-scatter", shard
            elif kind == "all-reduce":
                gathered = sum(part for part, operand in zip(_element_bytes(instruction.type),
                                                             source.operands)
                               if _zero_padded(by_name.get(operand), by_name, computations, n))
            moved = _moved(kind, size, n, 1)
            # slices a group spans (of slice_size devices each: `slices` is the mesh's leading
            # axis, so partition ids run slice by slice); over 1, part of it crosses DCN
            spans = max(len({i // slice_size for i in g}) for g in groups) if slice_size else 1
            dcn = _moved(kind, size, n, spans) if spans > 1 else 0
            asynchronous = (start is not None or name in in_async
                            or "async_collective_name=" in source.attrs)
            channel = re.search(r"channel_id=(\d+)", source.attrs)
            key = (name, source.name)
            if channel:  # the k-th op of a channel in one computation is the k-th in another
                key = (kind, channel.group(1), seen[kind, channel.group(1)])
                seen[kind, channel.group(1)] += 1
            old = found.setdefault(key, {
                "kind": kind, "computation": name, "name": instruction.name,
                "type": instruction.type, "bytes": 0, "executions": 0, "dcn_bytes": 0,
                "gathered": 0, "asynchronous": False})
            old.update(bytes=max(old["bytes"], moved),
                       executions=max(old["executions"], executions(name)),
                       dcn_bytes=max(old["dcn_bytes"], dcn),
                       gathered=max(old["gathered"], gathered / size if size else 0),
                       asynchronous=old["asynchronous"] or asynchronous)
    ops = _Ops(found.values())
    ops.unknown_loops = unknown_loops
    return ops
