"""Exclusive deltas inside vLLM's worker: build a *patch* once, apply/revert it on every state switch.

Runs in the worker process (through :mod:`deltaserve.server.worker_extension`), on
vLLM's own model object. What vLLM does to weights, and what that means here:

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
- **Plain tensors** (biases, norms, embeddings) are patched in place and copied back.
- **Bottleneck adapters** wrap the target layer's ``cpu_linear``:
  ``y = base(x); y + s·up(act(down(y)))`` — the reference kind's math
  (:class:`deltaserve.plugins.bottleneck.BottleneckAdapter`) on the same ``y``.
- **torch.compile.** vLLM compiles the decoder (unless LoRA is on, which forces
  eager on CPU) and Dynamo inlines ``cpu_linear`` at trace time with all guards
  dropped, so a swapped callable would be ignored by the compiled graph. An
  exclusive state therefore sets ``do_not_compile`` on the compiled modules (their
  forward then runs eagerly, reading the swapped callables) and the base state
  clears it again: base traffic keeps the compiled path and pays nothing.
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deltaserve.plugins.bottleneck import ADAPTER_FILE, BottleneckAdapter
from deltaserve.plugins.sparse import DELTA_FILE


@dataclass
class Target:
    """Where a checkpoint tensor lives in vLLM's model."""

    module_name: str
    module: torch.nn.Module
    """The module holding the parameter (a LoRA wrapper's ``base_layer`` when wrapped)."""
    param: str
    """``weight`` or ``bias`` (or another parameter name)."""
    row_offset: int
    rows: int | None
    """Rows of the (fused) parameter that belong to this checkpoint tensor; None: all."""
    shards: list[str] = field(default_factory=list)
    """For fused modules: the checkpoint module names of every shard, in order."""

    @property
    def packed(self) -> bool:
        """A weight the forward reads through ``cpu_linear`` (a packed GEMM handle on CPU)."""
        return self.param == "weight" and hasattr(self.module, "cpu_linear")


def _holder(module: torch.nn.Module) -> torch.nn.Module:
    """LoRA wraps layers in place; the weights and ``cpu_linear`` stay on ``base_layer``."""
    return getattr(module, "base_layer", module)


def _packed_mapping(model: torch.nn.Module) -> dict[str, list[str]]:
    mapping: dict[str, list[str]] = {}
    for module in model.modules():
        mapping.update(getattr(module, "packed_modules_mapping", {}) or {})
    return mapping


def resolve(model: torch.nn.Module, ckpt_name: str) -> Target:
    """Checkpoint tensor name → :class:`Target` in vLLM's module tree."""
    modules = dict(model.named_modules())
    module_name, _, param = ckpt_name.rpartition(".")
    if module_name in modules:
        holder = _holder(modules[module_name])
        if param in dict(holder.named_parameters(recurse=False)):
            return Target(module_name, holder, param, 0, None)
    parent, _, leaf = module_name.rpartition(".")
    for fused, parts in _packed_mapping(model).items():
        if leaf in parts and f"{parent}.{fused}" in modules:
            holder = _holder(modules[f"{parent}.{fused}"])
            sizes = list(holder.output_sizes)
            index = parts.index(leaf)
            return Target(
                f"{parent}.{fused}", holder, param, sum(sizes[:index]), sizes[index], [f"{parent}.{p}" for p in parts]
            )
    raise KeyError(f"vLLM's model has no tensor for checkpoint `{ckpt_name}`")


class CheckpointReader:
    """Base tensors by checkpoint name, read lazily from the base's safetensors files."""

    def __init__(self, base_dir: str | Path):
        self._where: dict[str, Path] = {}
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    self._where[key] = file

    def names(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), "pt") as f:
            return f.get_tensor(name)


def full_weight(target: Target, reader: CheckpointReader) -> torch.Tensor:
    """The whole (fused) weight of ``target``'s module, rebuilt from the checkpoint."""
    if target.shards:
        return torch.cat([reader.get(f"{s}.{target.param}") for s in target.shards], dim=0)
    return reader.get(f"{target.module_name}.{target.param}")


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
class Patch:
    """Everything one exclusive state changes, prepared ahead so a switch is only swaps."""

    linear: dict[str, tuple[torch.nn.Module, object]] = field(default_factory=dict)
    """module name → (holder module, replacement ``cpu_linear``)."""
    inplace: list[InPlace] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _row_view(target: Target) -> torch.Tensor:
    param = getattr(target.module, target.param)
    if target.rows is None:
        return param.data
    return param.data[target.row_offset : target.row_offset + target.rows]


def _apply_sparse(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    # The reference kind's arithmetic: w0 + (w - w0) in the parameter's dtype.
    flat[indices] = flat[indices] + values.to(flat.dtype)


def build_sparse_patch(model: torch.nn.Module, base_dir: str | Path, bundle_dir: str | Path, config: dict) -> Patch:
    tensors = load_file(str(Path(bundle_dir) / DELTA_FILE))
    reader = CheckpointReader(base_dir)
    patch = Patch()
    weights: dict[str, tuple[Target, torch.Tensor]] = {}  # packed module → (target, its full weight, being patched)
    for name, spec in config["params"].items():
        indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        shape = tuple(spec["shape"])
        target = resolve(model, name)
        if target.packed:
            if target.module_name not in weights:
                live = target.module.weight.data
                weights[target.module_name] = (target, live.clone() if live.numel() else full_weight(target, reader))
            tensor = weights[target.module_name][1]
        else:
            tensor = getattr(target.module, target.param).data
        # Rows of a fused tensor; leading rows of a padded one (vLLM pads vocabularies).
        rows = (
            tensor[target.row_offset : target.row_offset + shape[0]] if target.rows is not None else tensor[: shape[0]]
        )
        if tuple(rows.shape) != shape:
            raise ValueError(f"`{name}`: live tensor rows {tuple(rows.shape)} do not match checkpoint shape {shape}")
        if target.packed:
            _apply_sparse(rows.reshape(-1), indices, values)  # rows of a contiguous tensor: a view
        else:
            patched = rows.clone()
            _apply_sparse(patched.view(-1), indices, values)
            patch.inplace.append(InPlace(rows, patched, rows.clone()))
    for module_name, (target, weight) in weights.items():
        patch.linear[module_name] = (target.module, packed_linear(weight))
        live = target.module.weight.data
        if live.numel():  # a packed layer that also keeps its weight (lm_head, embeddings): patch that too
            patch.inplace.append(InPlace(live, weight, live.clone()))
    patch.summary = {"packed_layers": sorted(patch.linear), "inplace_tensors": len(patch.inplace)}
    return patch


def build_bottleneck_patch(model: torch.nn.Module, bundle_dir: str | Path, config: dict) -> Patch:
    tensors = load_file(str(Path(bundle_dir) / ADAPTER_FILE))
    modules = dict(model.named_modules())
    patch = Patch()
    for name in config["modules"]:
        if name not in modules:
            raise KeyError(
                f"bottleneck target `{name}` is not a module of vLLM's model (fused layers such as q_proj cannot be targets)"
            )
        holder = _holder(modules[name])
        if not hasattr(holder, "cpu_linear"):
            raise TypeError(f"bottleneck target `{name}` is not a linear layer served by a CPU GEMM")
        dim = tensors[f"{name}.up.weight"].shape[0]
        adapter = BottleneckAdapter(
            dim,
            config["bottleneck_dim"],
            config["activation"],
            config["scaling"],
            dtype=tensors[f"{name}.up.weight"].dtype,
        )
        adapter.load_tensors(name, tensors)
        adapter.eval().requires_grad_(False)
        base = holder.cpu_linear

        def adapted(x, weight, bias, _base=base, _adapter=adapter):
            return _adapter(_base(x, weight, bias))  # y + s·up(act(down(y)))

        patch.linear[name] = (holder, adapted)
    patch.summary = {"adapted_layers": sorted(patch.linear)}
    return patch


class StateManager:
    """The worker's engine states: staged patches and the one that is active."""

    BASE = "base"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.staged: dict[str, Patch] = {}
        self.current = self.BASE
        self._originals: dict[str, object] = {}  # module name → original cpu_linear
        self._compiled = [m for m in model.modules() if getattr(m, "do_not_compile", True) is False]

    def stage(self, state: str, patch: Patch) -> None:
        for name, (holder, _) in patch.linear.items():
            self._originals.setdefault(name, holder.cpu_linear)
        self.staged[state] = patch

    def activate(self, state: str) -> None:
        if state == self.current:
            return
        self._revert()
        if state == self.BASE:
            return
        patch = self.staged[state]
        for holder, replacement in patch.linear.values():
            holder.cpu_linear = replacement
        for item in patch.inplace:
            item.tensor.copy_(item.patched)
        for module in self._compiled:  # eager forward: the compiled graph would not see the swaps
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
        for module in self._compiled:
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
