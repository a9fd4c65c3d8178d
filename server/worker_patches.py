"""A delta's serving plan on vLLM's live model, and exclusive engine states.

Runs in the worker process (through :mod:`deltaserve.server.worker_extension`), on
vLLM's own model object. :func:`resolve_plan` turns a kind's
:class:`~deltaserve.plugins.serving.ServingPlan` into :class:`Changes` (per layer:
an updated packed GEMM, bias, output maps; other updated parameters). The shared
batch serves them per row (:mod:`deltaserve.server.worker_deltas`); the fallback is
an exclusive *state*, a :class:`Patch` applied/reverted on every state switch
(:class:`StateManager`). What vLLM does to weights, and what that means here:

- **Fused layers.** vLLM stacks ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj``
  into ``gate_up_proj`` along the output dimension (``packed_modules_mapping``,
  shard sizes in ``output_sizes``). A checkpoint name is resolved to (vLLM module,
  row offset, rows) by :func:`resolve`.
- **Packed GEMMs on CPU.** At load, vLLM packs each linear weight into a oneDNN (or
  sgl) handle and empties ``layer.weight``; the forward calls
  ``layer.cpu_linear(x, weight, bias)``. A patched linear therefore gets a *new*
  packed handle, built by vLLM's own ``dispatch_cpu_unquantized_gemm`` from the base
  weight (read from the checkpoint) plus the delta, and the state switch swaps the
  ``cpu_linear`` callable. Reverting puts the original callable back: the base
  handles are never touched, so the base state is restored bit-exactly by
  construction. (On GPU, layers keep plain weights: the same patch is a row-slice
  copy in place — :class:`InPlace` — but that path is not exercised by the test
  suite, which runs on CPU.)
- **Plain tensors** (norms, embeddings) are patched in place and copied back; an updated
  bias of a packed layer is passed to its GEMM call.
- **Output maps** (bottleneck adapters) wrap the target layer's ``cpu_linear``:
  ``y = base(x); f(y)`` — the kind's own module on the same ``y``.
- **torch.compile.** vLLM compiles the decoder (unless LoRA is on, which forces
  eager on CPU) and Dynamo inlines ``cpu_linear`` at trace time with all guards
  dropped, so a swapped callable would be ignored by the compiled graph. An
  exclusive state therefore sets ``do_not_compile`` on the compiled modules (their
  forward then runs eagerly, reading the swapped callables) and the base state
  clears it again: base traffic keeps the compiled path and pays nothing.
"""

from __future__ import annotations

import functools
import hashlib
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open


@dataclass(frozen=True)
class Split:
    """This worker's piece of a checkpoint tensor under tensor parallelism: ``full.narrow(dim, start, length)``."""

    dim: int
    start: int
    length: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(self.dim, self.start, self.length)


@dataclass
class Target:
    """Where a checkpoint tensor lives in vLLM's model (in this worker's shard)."""

    module_name: str
    module: torch.nn.Module
    """The module holding the parameter (a LoRA wrapper's ``base_layer`` when wrapped)."""
    param: str
    """``weight`` or ``bias`` (or another parameter name)."""
    row_offset: int
    rows: int | None
    """Rows of the (fused) local parameter that belong to this checkpoint tensor; None: all."""
    shards: list[str] = field(default_factory=list)
    """For fused modules: the checkpoint module names of every shard, in order."""
    checkpoint: str = ""
    """The checkpoint tensor name this target was resolved from."""
    split: Split | None = None
    """The part of the checkpoint tensor this worker holds; None: all of it (no tensor parallelism, or replicated)."""
    parallel: str = "replicated"
    """``column`` (output features sharded over workers), ``row`` (input features sharded, partial sums all-reduced
    after the GEMM) or ``replicated``."""

    @property
    def packed(self) -> bool:
        """A weight the forward reads through ``cpu_linear`` (a packed GEMM handle on CPU)."""
        return self.param == "weight" and hasattr(self.module, "cpu_linear")

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This worker's piece of the checkpoint-shaped tensor ``full``."""
        return full if self.split is None else self.split.take(full)


def _holder(module: torch.nn.Module) -> torch.nn.Module:
    """LoRA wraps layers in place; the weights and ``cpu_linear`` stay on ``base_layer``."""
    return getattr(module, "base_layer", module)


@functools.cache
def _tree(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, list[str]]]:
    """vLLM's module tree by name, and its fused-module mapping. The tree is fixed once the model is loaded
    (LoRA wraps layers at load; deltaserve only swaps callables), so it is read once per model."""
    mapping: dict[str, list[str]] = {}
    for module in model.modules():
        mapping.update(getattr(module, "packed_modules_mapping", {}) or {})
    return dict(model.named_modules()), mapping


def _tp(holder: torch.nn.Module) -> tuple[int, int]:
    """(world size, rank) of the layer's own tensor-parallel sharding (vLLM's ``disable_tp`` layers: (1, 0))."""
    return getattr(holder, "tp_size", 1), getattr(holder, "tp_rank", 0)


def _parallel_style(holder: torch.nn.Module) -> str:
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if _tp(holder)[0] == 1:
        return "replicated"
    if isinstance(holder, ColumnParallelLinear):
        return "column"
    if isinstance(holder, RowParallelLinear):
        return "row"
    if isinstance(holder, VocabParallelEmbedding):
        raise ValueError("vocabulary-parallel embeddings and LM heads are not served with tensor parallelism")
    return "replicated"


def _fused_part(holder: torch.nn.Module, index: int) -> tuple[int, int, int]:
    """(local row offset, local rows, start in the checkpoint tensor) of part ``index`` of a fused layer.
    vLLM's ``output_sizes`` are global; a worker holds ``1/tp`` of each part, except that K/V heads are replicated
    when there are fewer of them than workers."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    tp, rank = _tp(holder)
    if isinstance(holder, QKVParallelLinear):
        q, kv, v = (
            holder.num_heads * holder.head_size,
            holder.num_kv_heads * holder.head_size,
            holder.num_kv_heads * getattr(holder, "v_head_size", holder.head_size),
        )
        kv_rank = rank // holder.num_kv_head_replicas
        return [(0, q, rank * q), (q, kv, kv_rank * kv), (q + kv, v, kv_rank * v)][index]
    sizes = [size // tp for size in holder.output_sizes]
    return sum(sizes[:index]), sizes[index], rank * sizes[index]


def _vllm_name(model: torch.nn.Module, ckpt_name: str) -> str:
    """A checkpoint tensor name in vLLM's module tree: the model's own ``hf_to_vllm_mapper`` (the renaming vLLM
    applies when it loads the checkpoint), when it has one."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return (mapper.map_name(ckpt_name) if mapper is not None else None) or ckpt_name


def resolve(model: torch.nn.Module, ckpt_name: str) -> Target:
    """Checkpoint tensor name → :class:`Target` in vLLM's module tree (this worker's shard of it)."""
    modules, packed = _tree(model)
    module_name, _, param = _vllm_name(model, ckpt_name).rpartition(".")
    ckpt_parent = ckpt_name.rpartition(".")[0].rpartition(".")[0]
    if module_name in modules:
        holder = _holder(modules[module_name])
        if param in dict(holder.named_parameters(recurse=False)):
            style, rank = _parallel_style(holder), _tp(holder)[1]
            split = None
            if style == "column":
                n = holder.output_size_per_partition
                split = Split(0, rank * n, n)
            elif style == "row" and param == "weight":  # the bias is whole, added once (rank 0) before the reduce
                n = holder.input_size_per_partition
                split = Split(1, rank * n, n)
            return Target(module_name, holder, param, 0, None, split=split, parallel=style, checkpoint=ckpt_name)
    parent, _, leaf = module_name.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts and f"{parent}.{fused}" in modules:
            holder = _holder(modules[f"{parent}.{fused}"])
            style = _parallel_style(holder)
            offset, rows, start = _fused_part(holder, parts.index(leaf))
            return Target(
                f"{parent}.{fused}",
                holder,
                param,
                offset,
                rows,
                [f"{ckpt_parent}.{p}" for p in parts],
                split=Split(0, start, rows) if style != "replicated" else None,
                parallel=style,
                checkpoint=ckpt_name,
            )
    raise KeyError(f"vLLM's model has no tensor for checkpoint `{ckpt_name}`")


class CheckpointReader:
    """Base tensors by checkpoint name, read lazily from the base's safetensors files."""

    def __init__(self, base_dir: str | Path):
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    self._where[key] = file
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def names(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), "pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise KeyError(f"the base checkpoint has no tensor `{name}`")
        return self._shapes[name]


def full_weight(model: torch.nn.Module, target: Target, reader: CheckpointReader) -> torch.Tensor:
    """The whole (fused) local weight of ``target``'s module, rebuilt from the checkpoint (this worker's shard)."""
    if target.shards:
        parts = [f"{s}.{target.param}" for s in target.shards]
        return torch.cat([resolve(model, p).local(reader.get(p)) for p in parts], dim=0)
    return target.local(reader.get(target.checkpoint))


def packed_linear(weight: torch.Tensor):
    """A ``cpu_linear`` callable for ``weight``, packed exactly as vLLM packs base weights."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    standin = types.SimpleNamespace(weight=torch.nn.Parameter(weight.contiguous(), requires_grad=False))
    dispatch_cpu_unquantized_gemm(standin, remove_weight=True)
    return lambda x, _weight, bias, s=standin: s.cpu_linear(x, s.weight, bias)


@dataclass
class InPlace:
    tensor: torch.Tensor
    """A view of the live parameter (rows of a fused parameter, or all of it)."""
    patched: torch.Tensor
    original: torch.Tensor


@dataclass
class LayerChange:
    """What one delta changes in one linear layer served by ``cpu_linear``: maps on its input, its weight
    (a packed GEMM of the updated full weight), its bias, and maps on (columns of) its output, in that order."""

    gemm: object = None
    """``cpu_linear``-style callable over the updated weight, or None (the base GEMM)."""
    bias: torch.Tensor | None = None
    """Updated bias, or None (the base bias)."""
    outputs: list[tuple[object, int, int | None]] = field(default_factory=list)
    """(``y ↦ y'``, first column, columns or None for all) — a fused module's own columns."""
    inputs: list[object] = field(default_factory=list)
    """``x ↦ x'`` before the GEMM."""
    reduce_rank: int | None = None
    """Set on a row-parallel layer under tensor parallelism (this worker's rank): the GEMM gives partial sums,
    which are all-reduced before the output maps see them; rank 0 then returns the mapped rows, the other ranks
    zeros, so the layer's own all-reduce adds exact zeros to them."""

    @property
    def uses_base_output(self) -> bool:
        """Whether the base layer's output for the same rows is all it needs (output maps only)."""
        return self.gemm is None and self.bias is None and not self.inputs

    def __call__(self, base, x: torch.Tensor, weight, bias, y: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output under the delta. ``y``: the base output for ``x`` when already computed."""
        # The updated bias replaces the one vLLM passes; a row-parallel rank > 0 is passed none (added once).
        bias = self.bias if self.bias is not None and bias is not None else bias
        for fn in self.inputs:
            x = fn(x)
        if self.gemm is not None:
            y = self.gemm(x, weight, bias)
        elif y is None or not self.uses_base_output:
            y = base(x, weight, bias)
        if self.outputs and self.reduce_rank is not None:
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(y.contiguous())
        for fn, first, cols in self.outputs:
            if cols is None:
                y = fn(y)
            else:
                y = y.clone()
                y[..., first : first + cols] = fn(y[..., first : first + cols])
        if self.outputs and self.reduce_rank not in (None, 0):
            y = torch.zeros_like(y)
        return y


def _gathered(fn, length: int, rank: int):
    """``fn`` for a tensor whose last dimension is sharded over the tensor-parallel workers (``length`` features
    here, at ``rank``): gather the whole, apply ``fn``, keep this worker's features."""

    def sharded(t: torch.Tensor) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_gather

        return fn(tensor_model_parallel_all_gather(t.contiguous(), dim=-1)).narrow(-1, rank * length, length)

    return sharded


@dataclass
class Changes:
    """A serving plan resolved against vLLM's live model (built in the base state)."""

    linear: dict[str, tuple[torch.nn.Module, LayerChange]] = field(default_factory=dict)
    """vLLM module name → (module holding ``cpu_linear``, its change)."""
    params: dict[str, tuple[torch.nn.Module, str, torch.Tensor]] = field(default_factory=dict)
    """Other updated parameters: ``module.param`` → (module, parameter name, new full value)."""
    kept_weights: list[InPlace] = field(default_factory=list)
    """Packed layers that also keep their weight (LM head, tied embeddings): the kept copy, updated."""
    resident_bytes: int = 0
    """Memory the delta holds in the engine (updated weights, biases, norms, output-map parameters)."""

    @property
    def summary(self) -> dict:
        return {
            "layers": sorted(self.linear),
            "params": sorted(self.params),
            "resident_bytes": self.resident_bytes,
        }


def _nbytes(obj) -> int:
    """Bytes a plan entry holds: a tensor, a module's state, or the tensors a ``functools.partial`` binds."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(_nbytes(t) for t in obj.state_dict().values())
    bound = [*getattr(obj, "args", ()), *getattr(obj, "keywords", {}).values()]
    return sum(_nbytes(t) for t in bound if isinstance(t, torch.Tensor))


def resolve_plan(model: torch.nn.Module, base_dir: str | Path, plan) -> Changes:
    """:class:`~deltaserve.plugins.serving.ServingPlan` (checkpoint names) → :class:`Changes` on vLLM's model.

    Tensor updates are computed on the base value, read from the live model (or from the
    checkpoint for packed weights vLLM no longer keeps), one checkpoint tensor at a time
    into the full — possibly fused — parameter, so a fused ``qkv_proj`` gets one updated weight.
    """
    reader = CheckpointReader(base_dir)
    changes = Changes()
    full: dict[tuple[str, str], tuple[Target, torch.Tensor]] = {}  # (module, param) → (target, updated full value)
    for name, update in plan.tensors.items():
        target = resolve(model, name)
        key = (target.module_name, target.param)
        if key not in full:
            live = getattr(target.module, target.param).data
            value = live.clone() if live.numel() or not target.packed else full_weight(model, target, reader)
            full[key] = (target, value)
        value = full[key][1]
        shape = reader.shape(name)
        if target.split is None:
            # Rows of a fused tensor; leading rows of a padded one (vLLM pads vocabularies).
            rows = (
                value[target.row_offset : target.row_offset + shape[0]]
                if target.rows is not None
                else value[: shape[0]]
            )
            if tuple(rows.shape) != shape:
                raise ValueError(
                    f"`{name}`: live tensor rows {tuple(rows.shape)} do not match checkpoint shape {shape}"
                )
            base = rows.clone()
        else:  # a shard: the update sees the whole checkpoint tensor, this worker keeps its piece
            rows = value.narrow(0, target.row_offset, target.rows) if target.rows is not None else value
            base = reader.get(name).to(rows.dtype)
        new = update(base)
        if tuple(new.shape) != shape or new.dtype != rows.dtype:
            raise ValueError(f"`{name}`: the plan's update changed its shape or dtype")
        new = target.local(new)
        if new.shape != rows.shape:
            raise ValueError(
                f"`{name}`: this worker's shard {tuple(rows.shape)} is not the update's {tuple(new.shape)}"
            )
        rows.copy_(new)
    for (module_name, param), (target, value) in full.items():
        holder = target.module
        linear = hasattr(holder, "cpu_linear") and param in ("weight", "bias")
        if linear:
            change = changes.linear.setdefault(module_name, (holder, LayerChange()))[1]
            if param == "bias":
                change.bias = value
            else:
                change.gemm = packed_linear(value)
                if holder.weight.numel():
                    changes.kept_weights.append(InPlace(holder.weight.data, value, holder.weight.data.clone()))
        else:
            changes.params[f"{module_name}.{param}"] = (holder, param, value)
        changes.resident_bytes += _nbytes(value)
    for name, fn in plan.outputs.items():
        try:
            target = resolve(model, f"{name}.weight")
        except KeyError:
            raise KeyError(f"output map target `{name}` is not a module of vLLM's model") from None
        if not hasattr(target.module, "cpu_linear"):
            raise TypeError(f"output map target `{name}` is not a linear layer served by a CPU GEMM")
        change = changes.linear.setdefault(target.module_name, (target.module, LayerChange()))[1]
        if target.parallel == "column":  # this worker holds some of the output features
            if getattr(target.module, "num_kv_head_replicas", 1) > 1:
                raise ValueError(f"output map on `{name}`: K/V heads replicated over workers are not supported")
            cols = target.rows if target.rows is not None else target.module.output_size_per_partition
            fn = _gathered(fn, cols, _tp(target.module)[1])
        elif target.parallel == "row":
            change.reduce_rank = _tp(target.module)[1]
        change.outputs.append((fn, target.row_offset, target.rows))
        changes.resident_bytes += _nbytes(fn)
    for name, fn in plan.inputs.items():
        target = resolve(model, f"{name}.weight")
        if target.rows is not None or not hasattr(target.module, "cpu_linear"):
            raise TypeError(
                f"input map target `{name}` is not an unfused linear layer (vLLM module `{target.module_name}`)"
            )
        changes.resident_bytes += _nbytes(fn)
        if target.parallel == "row":  # this worker sees some of the input features
            fn = _gathered(fn, target.module.input_size_per_partition, _tp(target.module)[1])
        changes.linear.setdefault(target.module_name, (target.module, LayerChange()))[1].inputs.append(fn)
    return changes


@dataclass
class Patch:
    """An exclusive engine state, prepared ahead so a switch is only swaps."""

    linear: dict[str, tuple[torch.nn.Module, object]] = field(default_factory=dict)
    """module name → (holder module, replacement ``cpu_linear``)."""
    inplace: list[InPlace] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def exclusive_patch(changes: Changes) -> Patch:
    """:class:`Changes` as an engine state: replaced ``cpu_linear`` callables and in-place tensor copies."""
    patch = Patch(summary=changes.summary)
    for name, (holder, change) in changes.linear.items():
        base = holder.cpu_linear

        def replaced(x, weight, bias, _base=base, _change=change):
            return _change(_base, x, weight, bias)

        patch.linear[name] = (holder, replaced)
    patch.inplace.extend(changes.kept_weights)
    for holder, param, value in changes.params.values():
        live = getattr(holder, param).data
        patch.inplace.append(InPlace(live, value, live.clone()))
    return patch


class StateManager:
    """The worker's engine states: staged patches and the one that is active."""

    BASE = "base"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.staged: dict[str, Patch] = {}
        self.current = self.BASE
        self._originals: dict[str, object] = {}  # module name → the cpu_linear the active state replaced
        self.compiled = [m for m in model.modules() if getattr(m, "do_not_compile", True) is False]
        """Modules vLLM compiled (their ``do_not_compile`` is False)."""

    def stage(self, state: str, patch: Patch) -> None:
        self.staged[state] = patch

    def activate(self, state: str) -> None:
        if state == self.current:
            return
        self._revert()
        if state == self.BASE:
            return
        patch = self.staged[state]
        # Saved at activation, not at staging: a concurrent delta may have put its dispatcher there since.
        self._originals = {name: holder.cpu_linear for name, (holder, _) in patch.linear.items()}
        for holder, replacement in patch.linear.values():
            holder.cpu_linear = replacement
        for item in patch.inplace:
            item.tensor.copy_(item.patched)
        for module in self.compiled:  # eager forward: the compiled graph would not see the swaps
            module.do_not_compile = True
        self.current = state

    def _revert(self) -> None:
        if self.current == self.BASE:
            return
        patch = self.staged[self.current]
        for name, (holder, _) in patch.linear.items():
            holder.cpu_linear = self._originals[name]
        for item in patch.inplace:
            item.tensor.copy_(item.original)
        for module in self.compiled:
            module.do_not_compile = False
        self.current = self.BASE

    def unstage(self, state: str) -> None:
        if state == self.current:
            self.activate(self.BASE)
        self.staged.pop(state, None)


def live_tensor(model: torch.nn.Module, ckpt_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The value vLLM computes with for a checkpoint tensor, read back from the live model.

    Weights behind ``cpu_linear`` are read by probing the live callable with the
    identity (``I @ W^T = W^T``: every product is ``w·1``, every sum adds exact zeros);
    where the module also keeps its weight, the two must agree.
    """
    target = resolve(model, ckpt_name)
    module = target.module
    if target.packed:
        n_in = shape[1]
        full = (
            module.cpu_linear(torch.eye(n_in, dtype=module.weight.dtype), module.weight, None).t().contiguous()
        )  # [out_total, in]
        if module.weight.numel() and not torch.equal(full, module.weight.data[: full.shape[0]]):
            raise AssertionError(f"`{target.module_name}`: the packed GEMM and the kept weight disagree")
    else:
        full = getattr(module, target.param).data
    rows = full[target.row_offset : target.row_offset + shape[0]] if target.rows is not None else full[: shape[0]]
    return rows.reshape(shape)


def live_hashes(model: torch.nn.Module, base_dir: str | Path) -> dict[str, str]:
    """sha256 of every checkpoint tensor vLLM holds, as the live model would compute with it."""
    reader = CheckpointReader(base_dir)
    out = {}
    for name in reader.names():
        shape = tuple(reader.get(name).shape)
        try:
            tensor = live_tensor(model, name, shape)
        except KeyError:
            continue  # not held by vLLM (e.g. an unused final vision layernorm)
        out[name] = hashlib.sha256(tensor.contiguous().to(torch.float32).numpy().tobytes()).hexdigest()
    return out


def checkpoint_hashes(base_dir: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """The same digests as :func:`live_hashes`, from the checkpoint files (what the fingerprint covers)."""
    reader = CheckpointReader(base_dir)
    return {
        name: hashlib.sha256(reader.get(name).contiguous().to(torch.float32).numpy().tobytes()).hexdigest()
        for name in (names if names is not None else reader.names())
    }
