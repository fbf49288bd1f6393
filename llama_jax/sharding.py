"""Device mesh, logical-axis rules, and sharded initialisation.

Every parameter and key activation of the model carries logical axis names (`batch,
length, embed, heads, kv_heads, head_dim, mlp, vocab, layers, norm`). One rules table maps
them onto the mesh axes `data, fsdp, tensor`; a run's parallelism is that table plus the
mesh shape, both config, never code.

Rules are applied in order and a mesh axis is used at most once per array (Flax's
semantics): for an activation (`batch`, `length`, `embed`) the batch takes `data` and
`fsdp`, so `embed` (which takes `fsdp` on parameters) stays unsharded there.

Where a dimension is not divisible by the mesh axes its rule assigns (a tiny model's odd
vocabulary, or fewer kv heads than the tensor axis as in 70B on tensor=16), that dimension
is replicated instead; `heads` not divisible by `tensor` is an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# The default rules table (experiments copy it into `config.mesh.rules`).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


# Every logical axis name the model's parameters, activations and KV cache carry.
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


class MeshError(ValueError):
    pass


def normalize_rules(rules, complete: bool = False) -> tuple[tuple[str, Any], ...]:
    """Accepts rules as pairs (lists from a config are fine) and returns tuples. A logical
    name the model does not have (a misspelt `embd` would leave `embed` unsharded) or given
    twice is an error; with `complete`, so is a logical name with no rule."""
    if not isinstance(rules, (list, tuple)):
        raise MeshError(f"mesh.rules must be a list of (logical_name, mesh_axes) pairs, got {rules!r}")
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshError(f"sharding rule #{i} {rule!r} must be (logical_name, mesh_axes)")
        name, axes = rule
        if name not in LOGICAL_AXES:
            import difflib

            near = difflib.get_close_matches(name, LOGICAL_AXES, n=1)
            raise MeshError(f"sharding rule #{i} names logical axis {name!r}, which the model does not have"
                            f"{f' (meant {near[0]!r}?)' if near else ''}; its logical axes are {LOGICAL_AXES}")
        if any(name == seen for seen, _ in out):
            raise MeshError(f"sharding rule #{i}: logical axis {name!r} has a rule already (the first would win)")
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [axes] if axes is not None and axes not in MESH_AXES else []
        if bad:
            import difflib

            near = [m for b in bad for m in difflib.get_close_matches(str(b), MESH_AXES, n=1)]
            raise MeshError(f"sharding rule #{i} for {name!r} names unknown mesh axes {bad}"
                            f"{f' (meant {near[0]!r}?)' if near else ''}; mesh axes are {MESH_AXES}")
        out.append((name, axes))
    missing = [n for n in LOGICAL_AXES if n not in dict(out)]
    if complete and missing:
        raise MeshError(f"mesh.rules has no rule for {missing} (a rule ('{missing[0]}', None) replicates it); every "
                        f"logical axis needs one: {LOGICAL_AXES}")
    return tuple(out)


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves one -1 entry to "the rest of the devices" and checks the product."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for k, v in sizes.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise MeshError(f"mesh.{k} must be a positive integer or -1, got {v!r}")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {free} ({sizes})")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise MeshError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = n // fixed
    total = math.prod(sizes.values())
    if total != n:
        raise MeshError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
                        f"= {total} devices, but {n} devices are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, num_devices=len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # topology-unaware fallback (e.g. an unusual device subset)
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_cfg) -> Mesh:
    """`mesh_cfg` has fields data, fsdp, tensor (a ConfigDict or dict)."""
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
    return make_mesh(get("data", 1), get("fsdp", -1), get("tensor", 1))


def run_mesh(mesh_cfg) -> tuple[Mesh, dict]:
    """(mesh, rules) of a run's `config.mesh`: every model of the run lives on these."""
    return mesh_from_config(mesh_cfg), normalize_rules(mesh_cfg.rules, complete=True)


def check_model_fits_mesh(config, mesh: Mesh) -> None:
    """Errors for model/mesh combinations that cannot be sharded as the rules ask."""
    t = mesh.shape["tensor"]
    if config.n_heads % t:
        raise MeshError(f"model n_heads={config.n_heads} is not divisible by mesh tensor={t}")


# ----------------------------------------------------------------------------------
# Logical names -> shardings
# ----------------------------------------------------------------------------------


def _axis_size(mesh_axes, mesh_sizes) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        return mesh_sizes[mesh_axes]
    return math.prod(mesh_sizes[a] for a in mesh_axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules, mesh_sizes) -> P:
    """PartitionSpec for an array of `shape` with logical axis `names`; dimensions not
    divisible by their mesh axes are replicated."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        fitted.append(axes if dim % _axis_size(axes, mesh_sizes) == 0 else None)
    return P(*fitted)


def _sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def replication_note(model: nn.Module, mesh: Mesh, rules) -> str | None:
    """Where the rules' mesh axes do not divide parameters' dimensions, those dimensions are
    replicated (`logical_to_spec`): harmless for a small odd vocabulary, but an `fsdp` that
    does not divide the model width leaves every weight whole on each device. A note naming
    the mesh axes and the first parameters they missed, when it makes the parameters per
    device more than a quarter larger than the rules ask; else None."""
    rules = normalize_rules(rules)
    sizes = _sizes(mesh)
    with activate(mesh, rules):
        boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    asked = got = 0
    missed: dict[str, list[str]] = {}
    for path, leaf in leaves:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        shape, itemsize = leaf.value.shape, leaf.value.dtype.itemsize
        spec = tuple(nn.logical_to_mesh_axes(tuple(leaf.names), rules))
        spec += (None,) * (len(shape) - len(spec))
        fitted = tuple(logical_to_spec(leaf.names, shape, rules, sizes)) + (None,) * len(shape)
        asked += math.prod(d // _axis_size(a, sizes) if d % _axis_size(a, sizes) == 0 else d / _axis_size(a, sizes)
                           for d, a in zip(shape, spec)) * itemsize
        got += math.prod(d // _axis_size(a, sizes) for d, a in zip(shape, fitted)) * itemsize
        for dim, (d, a, f) in enumerate(zip(shape, spec, fitted)):
            if a is not None and f is None and _axis_size(a, sizes) > 1:
                key = " x ".join(f"{x}={sizes[x]}" for x in ((a,) if isinstance(a, str) else a))
                missed.setdefault(key, []).append(
                    f"{jax.tree_util.keystr(path, simple=True, separator='/')} ({leaf.names[dim]} {d})")
    if got <= 1.25 * asked:
        return None
    detail = "; ".join(f"mesh {axes} does not divide {len(names)} parameters' dimensions, e.g. {names[0]}"
                       for axes, names in missed.items())
    def size(n):
        return f"{n / 2**30:.2f} GiB" if asked >= 2**30 else f"{n / 2**20:.2f} MiB"

    return (f"the parameters take {size(got)} per device, not the {size(asked)} the rules ask "
            f"(optimizer state alike): {detail}; those dimensions are replicated. Choose config.mesh sizes that "
            "divide them")


def logical_shardings(abstract_boxed, mesh: Mesh, rules) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` boxes (e.g. from
    `jax.eval_shape(model.init, ...)`). Unboxed leaves are replicated."""
    rules = normalize_rules(rules)
    sizes = _sizes(mesh)

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            shape = leaf.value.shape
            return NamedSharding(mesh, logical_to_spec(leaf.names, shape, rules, sizes))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def named_sharding(mesh: Mesh, rules, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, normalize_rules(rules), _sizes(mesh)))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the rules split the batch axis on `mesh` (data x fsdp by default)."""
    return _axis_size(nn.logical_to_mesh_axes(("batch",), normalize_rules(rules))[0], _sizes(mesh))


def batch_sharding(mesh: Mesh, rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a [B, T, ...] batch array (batch over data x fsdp by default)."""
    names = ("batch", "length") + (None,) * (len(shape) - 2)
    return named_sharding(mesh, rules, names[: len(shape)], shape)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Context in which model activation constraints apply: traces made inside it shard
    activations by `rules` over `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules)):
        yield


def active_spec(names: Sequence[str | None], shape: Sequence[int]) -> P | None:
    """The PartitionSpec the active rules give an array of `shape` with logical `names`;
    None outside `activate`."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    return logical_to_spec(names, shape, rules, dict(zip(mesh.axis_names, mesh.axis_sizes)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activate`."""
    spec = active_spec(names, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


# ----------------------------------------------------------------------------------
# Sharded initialisation: shapes -> shardings -> parameters
# ----------------------------------------------------------------------------------


def init_params(model: nn.Module, rng: jax.Array, mesh: Mesh, rules, seq_len: int = 8, given=None):
    """Initialises `model`'s params directly into their shardings (no host ever holds the
    full model). Returns (params, shardings), both unboxed pytrees. `given` (params of the
    same tree, e.g. a checkpoint's): its leaves (same path and shape) are taken, and only
    the others are initialised (XLA drops the rest of the init: a fine-tuning stage does
    not build a random copy of the model it loads), with the values a whole init gives."""
    rules = normalize_rules(rules)
    if hasattr(model, "config"):
        check_model_fits_mesh(model.config, mesh)

    def init_fn(key):
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        return model.init(key, tokens)["params"]

    with activate(mesh, rules):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = nn.meta.unbox(logical_shardings(abstract, mesh, rules))
        if given is None:
            return jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=shardings)(rng), shardings
        have = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(given)}
        plain = jax.eval_shape(lambda k: nn.meta.unbox(init_fn(k)), rng)
        leaves = jax.tree_util.tree_leaves_with_path(plain)
        missing = [jax.tree_util.keystr(p) for p, x in leaves
                   if jax.tree_util.keystr(p) not in have or have[jax.tree_util.keystr(p)].shape != x.shape]
        flat_sh = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}

        def only_missing(k):
            flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
                nn.meta.unbox(init_fn(k)))}
            return {key: flat[key] for key in missing}

        fresh = jax.jit(only_missing, out_shardings={key: flat_sh[key] for key in missing})(rng) if missing else {}
        params = jax.tree_util.tree_map_with_path(
            lambda p, _: fresh[jax.tree_util.keystr(p)] if jax.tree_util.keystr(p) in fresh else
            have[jax.tree_util.keystr(p)], plain)
    return params, shardings


def abstract_params(model: nn.Module, seq_len: int = 8):
    """ShapeDtypeStructs of the params (no memory, any size)."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda k, t: model.init(k, t)["params"], jax.random.key(0), tokens)
    return nn.meta.unbox(boxed)


def _paths(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(np.shape(x)) for p, x in leaves}


def check_params_match(params, expected, what: str = "params") -> None:
    """Raises a ValueError naming missing, unexpected and mis-shaped leaves."""
    got, want = _paths(params), _paths(expected)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k} {got[k]} (expected {want[k]})" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) + (
        [f"wrong shapes: {', '.join(shapes)}"] if shapes else [])
    if problems:
        raise ValueError(f"{what} do not match the model: " + "; ".join(problems))


def param_shardings_like(params, model: nn.Module, mesh: Mesh, rules):
    """Shardings for an existing (e.g. converted) params pytree of `model`; the tree must
    match the model's exactly."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    with activate(mesh, rules):
        boxed = jax.eval_shape(lambda k, t: model.init(k, t)["params"], jax.random.key(0), tokens)
    check_params_match(params, nn.meta.unbox(boxed))
    return nn.meta.unbox(logical_shardings(boxed, mesh, rules))


def cache_shardings(cache, mesh: Mesh, rules):
    """Shardings for a `KVCache` by its logical axes (batch over data x fsdp, kv heads
    over tensor), so decoding keeps the cache split like the activations."""
    rules = normalize_rules(rules)
    sizes = _sizes(mesh)
    return type(cache)(**{name: NamedSharding(mesh, logical_to_spec(axes, getattr(cache, name).shape, rules, sizes))
                          for name, axes in cache.logical_axes.items()})


def shard_params(params, model: nn.Module, mesh: Mesh, rules):
    """Places host params (e.g. from a converter) onto the mesh."""
    check_model_fits_mesh(model.config, mesh)
    shardings = param_shardings_like(params, model, mesh, rules)
    return jax.device_put(params, shardings)


def without_fsdp(rules) -> tuple[tuple[str, Any], ...]:
    """The rules with the `fsdp` mesh axis taken off every logical axis but `batch`:
    parameters then live whole on each FSDP group (split over `tensor` only) while the
    batch stays split as before."""
    out = []
    for name, axes in normalize_rules(rules):
        if name != "batch":
            if isinstance(axes, tuple):
                axes = tuple(a for a in axes if a != "fsdp") or None
            elif axes == "fsdp":
                axes = None
        out.append((name, axes))
    return tuple(out)


def generation_rules(model: nn.Module, mesh: Mesh, rules, memory_limit: int | None = None):
    """The rules to sample with from a copy of `model`'s parameters gathered over `fsdp`
    (`without_fsdp`), after checking that the copy fits: an error naming
    `mesh.gather_for_generation` if it would take more than 60% of a device's memory
    (`memory_limit` bytes, else the device's own limit where JAX reports one; not on CPU)."""
    gathered = without_fsdp(rules)
    if memory_limit is None:
        try:
            memory_limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 - a backend without memory statistics (CPU)
            memory_limit = None
    if memory_limit:
        shapes = jax.eval_shape(_for_generation(model), abstract_params(model))
        shardings = param_shardings_like(shapes, model, mesh, gathered)
        need = sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize for x, sh in
                   zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)))
        if need > 0.6 * memory_limit:
            raise MeshError(f"mesh.gather_for_generation: the gathered copy of the model takes {need / 2**30:.1f} GiB "
                            f"per device (its parameters over tensor={mesh.shape['tensor']}), more than 60% of the "
                            f"device's {memory_limit / 2**30:.1f} GiB; raise mesh.tensor or set "
                            "mesh.gather_for_generation=false")
    return gathered


def gather_for_generation(model: nn.Module, mesh: Mesh, rules, memory_limit: int | None = None):
    """(gather, rules) for sampling from an FSDP-sharded model (paper 3.2.3: "we
    consolidated the model weights to each node once before generation and then freed
    the memory after generation"): `gather(params)` all-gathers them over `fsdp` once into
    a copy split over `tensor` only, to use with the returned rules, so the decode loop does
    not gather every layer at every token. Its weight matrices are in the model's compute
    dtype (`_for_generation`). The copy is freed when the caller drops it.
    `config.mesh.gather_for_generation` turns it on for every stage that samples."""
    gathered = generation_rules(model, mesh, rules, memory_limit)
    shardings = param_shardings_like(abstract_params(model), model, mesh, gathered)
    return jax.jit(_for_generation(model), out_shardings=shardings), gathered


def _for_generation(model: nn.Module):
    """params -> the copy sampling uses: weight matrices in the model's compute dtype (the
    decode casts them to it anyway: a bfloat16 model's float32 weights would take twice the
    memory), norm scales and the scalar heads (which compute in float32) as they are."""
    dtype = jnp.dtype(model.config.compute_dtype)

    def cast(path, x):
        head = any(getattr(k, "key", None) in ("score_head", "value_head") for k in path)
        return x.astype(dtype) if x.ndim >= 2 and not head and jnp.issubdtype(x.dtype, jnp.floating) else x

    return lambda params: jax.tree_util.tree_map_with_path(cast, params)
