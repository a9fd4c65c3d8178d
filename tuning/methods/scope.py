"""The trainable scope every tuning method shares: which part of the base may change.

As in the SPIDER authors' LLaVA trainer: the vision→language projector plus the last N
decoder layers train, the vision tower is frozen (``train_vision_tower`` opens it).
Embeddings, the final norm and the LM head stay frozen: the tuned tasks answer with
tokens the base already has.

Selective methods (spider, magnitude, full) train the scope's *parameters*. Additive and
reparameterised methods (bottleneck, lora) train new modules on the scope's *linear
modules inside the decoder layers*: vLLM applies LoRA only to the language model, and
the bundle kinds accept targets only there, so the projector is outside their reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.plugins.families import family_of

NamedParams = list[tuple[str, torch.nn.Parameter]]


@dataclass(frozen=True)
class Scope:
    """What may change during tuning: parts named by the base's family (:mod:`deltaserve.plugins.families`)."""

    last_n_layers: int = 2
    """Decoder layers counted from the top that train (0: none)."""
    train_projector: bool = True
    """The multimodal projector trains (selective methods only; see the module docstring)."""
    train_vision_tower: bool = False
    """The CLIP vision tower trains too (selective methods only)."""
    train_lm_head: bool = False
    """The LM head (output embedding) trains too (selective methods only): the downstream answers
    use tokens the base never emitted (numerals, ``above``/``below``), whose frozen rows pretraining
    pushed away from every hidden state."""

    def layer_indices(self, model: torch.nn.Module) -> list[int]:
        total = model.config.text_config.num_hidden_layers
        if not 0 <= self.last_n_layers <= total:
            raise ValueError(f"`last_n_layers` must lie in [0, {total}] for this base, got {self.last_n_layers}")
        return list(range(total - self.last_n_layers, total))

    def parameters(self, model: torch.nn.Module) -> NamedParams:
        """The scope's parameters, in model order."""
        family = family_of(model)
        prefixes = [f"{family.decoder_layers}{i}." for i in self.layer_indices(model)]
        if self.train_projector:
            prefixes.append(family.projector)
        if self.train_vision_tower:
            prefixes.append(family.vision_tower)
        if self.train_lm_head:
            prefixes.append(family.lm_head)
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(tuple(prefixes))]
        if not params:
            raise ValueError("the trainable scope is empty (set `last_n_layers` > 0 or train the projector)")
        return params

    def decoder_linears(self, model: torch.nn.Module, names: tuple[str, ...] | None = None) -> list[str]:
        """Module names of the ``nn.Linear`` layers inside the scope's decoder layers (optionally only
        those whose last name component is in ``names``), in model order."""
        prefixes = tuple(f"{family_of(model).decoder_layers}{i}." for i in self.layer_indices(model))
        found = [
            n
            for n, m in model.named_modules()
            if n.startswith(prefixes)
            and isinstance(m, torch.nn.Linear)
            and (names is None or n.rsplit(".", 1)[-1] in names)
        ]
        if not found:
            raise ValueError("no linear module of the decoder is in scope (set `last_n_layers` > 0)")
        return found

    def as_dict(self) -> dict:
        return {
            "last_n_layers": self.last_n_layers,
            "train_projector": self.train_projector,
            "train_vision_tower": self.train_vision_tower,
            "train_lm_head": self.train_lm_head,
        }
