"""Wanda: weights ranked by ``|w| x ||x||``, the weight's magnitude times the norm of the input feature it multiplies.

Magnitude alone ignores that a language model's inputs have a few features far larger than the rest: a small weight
on such a feature matters more than a large one on a quiet feature. Wanda (Sun et al., 2023) scores each weight
``W[i, j]`` by ``|W[i, j]| * ||X[:, j]||_2`` over calibration tokens, and compares weights within each output row
(unstructured) or within each group of ``m`` consecutive inputs (``N:M``). No gradient, no weight update: one pass
of forward hooks. Written here from the paper's description.

During training the norms are gathered by forward hooks on the layers whose weights are pruned, in training mode,
between two mask computations; a one-shot schedule at step 0 runs the first batch once to gather them first. Under
DDP, rank 0's norms decide the masks, which every rank then applies (contract 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_accel._core.inputs import batch_picker, run_model
from lightning_accel._core.modules import is_transposed_linear
from lightning_accel.pruning.masks import n_m_mask, parse_pattern


def _owner(model: nn.Module, parameter_name: str) -> nn.Module:
    module_name = parameter_name.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


def _computes_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def wanda_layers(model: nn.Module, parameter_names: Iterable[str]) -> dict[str, tuple[nn.Module, bool]]:
    """For each pruned weight, the layer that multiplies it with its input, and whether it is stored transposed.

    Raises:
        ValueError: naming the weights that are not the weight of a Linear or transposed Linear (GPT-2's
            ``Conv1D``): Wanda needs each weight's input features.
    """
    layers, refused = {}, []
    for name in parameter_names:
        module = _owner(model, name)
        if name.endswith("weight") and (_computes_linear(module) or is_transposed_linear(module)):
            layers[name] = (module, is_transposed_linear(module))
        else:
            refused.append(f"{name} ({type(module).__name__})")
    if refused:
        raise ValueError(
            f"importance='wanda' ranks the weights of Linear layers by their input norms; these pruned parameters "
            f"are not Linear weights: {refused[:6]}{' ...' if len(refused) > 6 else ''}. Exclude them "
            "(`exclude=[...]`) or use importance='magnitude'"
        )
    return layers


@dataclass(frozen=True)
class WandaNorms:
    """Input-feature norms per pruned weight, and which weights are stored transposed: what the masks need."""

    norms: dict[str, Tensor]
    transposed: frozenset[str]


class WandaImportance:
    """Squared input norms per feature of every pruned Linear weight, gathered by forward hooks.

    Args:
        model: The module whose layers are pruned.
        parameter_names: The pruned weights (names in ``model``).
    """

    def __init__(self, model: nn.Module, parameter_names: Iterable[str]) -> None:
        self.layers = wanda_layers(model, parameter_names)
        self.sums = {name: self._zeros(name) for name in self.layers}
        self.tokens = 0
        #: Names of the weights stored ``[in, out]`` (transposed Linears).
        self.transposed = frozenset(name for name, (_, transposed) in self.layers.items() if transposed)
        self._handles: list[Any] = []
        self._counted_by = next(iter(self.layers), None)

    def _zeros(self, name: str) -> Tensor:
        module, transposed = self.layers[name]
        return torch.zeros(module.weight.shape[0 if transposed else 1], dtype=torch.float64)

    def attach(self) -> None:
        """Register the hooks (training-mode forwards count; validation passes do not)."""
        self.detach()
        self._handles = [
            module.register_forward_pre_hook(self._hook(name)) for name, (module, _) in self.layers.items()
        ]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str) -> Any:
        def add(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not (module.training or self._gathering) or not args or not isinstance(args[0], Tensor):
                return
            inputs = args[0].detach()
            flat = inputs.reshape(-1, inputs.shape[-1]).float()
            self.sums[name] += flat.square().sum(0).to(device="cpu", dtype=torch.float64)
            if name == self._counted_by:  # one layer counts the tokens for all
                self.tokens += flat.shape[0]

        return add

    _gathering = False

    @torch.no_grad()
    def gather(self, model: nn.Module, batches: Iterable[Any], model_input: Any = None) -> None:
        """Run ``model`` on ``batches`` (eval mode, no gradient) to gather norms outside training."""
        pick = batch_picker(model_input, model)
        was_training = model.training
        model.eval()
        self._gathering = True
        temporary = not self._handles
        if temporary:
            self.attach()
        try:
            for batch in batches:
                run_model(model, pick(batch))
        finally:
            self._gathering = False
            model.train(was_training)
            if temporary:
                self.detach()

    def take(self, model: nn.Module | None = None, batch: Any = None) -> WandaNorms | None:
        """Each weight's input norms ``||X[:, j]||`` (gathering on ``batch`` first when none were seen), then reset."""
        if self.tokens == 0 and model is not None and batch is not None:
            self.gather(model, [batch])
        if self.tokens == 0:
            return None
        norms = {name: torch.sqrt(total) for name, total in self.sums.items()}
        self.sums = {name: self._zeros(name) for name in self.layers}
        self.tokens = 0
        return WandaNorms(norms, self.transposed)

    def state_dict(self) -> dict[str, Any]:
        """The sums gathered since the last masks (float64 CPU tensors) and the token count."""
        return {"sums": {name: total.clone() for name, total in self.sums.items()}, "tokens": self.tokens}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore gathered sums; sums for other layers are refused."""
        sums = dict(state.get("sums") or {})
        if not sums:
            return
        if {k: v.numel() for k, v in sums.items()} != {k: v.numel() for k, v in self.sums.items()}:
            raise ValueError("The checkpoint's Wanda input norms belong to other layers than the ones pruned here")
        self.sums = {name: total.to(torch.float64).clone() for name, total in sums.items()}
        self.tokens = int(state.get("tokens", 0))


def wanda_masks(
    weights: Mapping[str, Tensor],
    norms: Mapping[str, Tensor],
    sparsity: float,
    pattern: str = "unstructured",
    previous: Mapping[str, Tensor] | None = None,
    transposed: Iterable[str] = (),
) -> dict[str, Tensor]:
    """Keep-masks ranking ``|W| x ||x||``: per output row (unstructured) or per ``m`` consecutive inputs (``N:M``).

    Args:
        weights: Pruned weights by name (``[out, in]``; names in ``transposed`` are stored ``[in, out]``).
        norms: Input-feature norms by name (:meth:`WandaImportance.take`).
        sparsity: Fraction of zeros to reach.
        pattern: ``"unstructured"`` or ``"N:M"``.
        previous: Earlier masks: what they pruned stays pruned (zero weights score zero and are chosen first).
        transposed: Names of weights stored ``[in, out]`` (GPT-2's ``Conv1D``).
    """
    transposed = set(transposed)
    parsed = parse_pattern(pattern)
    masks = {}
    for name, weight in weights.items():
        as_rows = weight.detach().T if name in transposed else weight.detach()
        score = as_rows.float().abs() * norms[name].to(device=weight.device, dtype=torch.float32).reshape(1, -1)
        if previous is not None and name in previous:
            kept = previous[name].T if name in transposed else previous[name]
            score = score.masked_fill(~kept.to(score.device), -1.0)
        if parsed.kind == "N:M":
            mask = n_m_mask(score, parsed.n, parsed.m, sparsity)
        else:
            count = round(sparsity * score.shape[1])
            order = torch.sort(score, dim=1, stable=True).indices[:, :count]
            mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, order, False)
        masks[name] = (mask.T if name in transposed else mask).contiguous()
    return masks
