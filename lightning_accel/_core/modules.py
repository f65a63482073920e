"""Selecting modules and parameters by include/exclude glob patterns: one convention for every callback.

A pattern names **modules**: ``"head"`` selects the module ``head`` and everything inside it, ``"encoder.*"``
every module below ``encoder``; a pattern that matches a module's parameter names (``"head.*"``) names that
module too, so both spellings mean the same in every callback. Pruning acts on the weights of the selected
Linear/Conv modules, QAT quantizes the selected Linear/Conv modules themselves. A pattern whose last part is a
literal parameter name (``"*.in_proj_weight"``, ``"head.weight"``) names that **parameter** directly, which lets
pruning reach weights outside Linear/Conv modules. Patterns use ``fnmatch`` rules (``*`` also crosses dots).

A pattern that matches no name raises an error that lists names that exist: a typo must never silently select
everything or nothing.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

#: Module types whose ``weight`` the callbacks act on by default.
WEIGHT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_GLOB_CHARACTERS = frozenset("*?[")


#: torch's BatchNorm layers (a subclass with an activation inside is told apart where it matters).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes ``x @ weight + bias`` with ``weight`` stored ``in x out`` (GPT-2's ``Conv1D``).

    Decided from what the module computes, not from its type (contract 12): a leaf module other than ``nn.Linear``
    whose parameters are exactly a 2-D ``weight`` and a matching ``bias``, and whose output on a probe input is the
    transposed matrix product.
    """
    if isinstance(module, nn.Linear) or any(True for _ in module.children()):
        return False
    parameters = dict(module.named_parameters(recurse=False))
    weight, bias = parameters.get("weight"), parameters.get("bias")
    if set(parameters) != {"weight", "bias"} or weight.dim() != 2 or bias.shape != (weight.shape[1],):
        return False
    cached = getattr(module, "_accel_transposed_linear", None)
    if cached is not None and cached[0] == tuple(weight.shape):
        return cached[1]
    try:
        with torch.no_grad():
            probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
            probe = probe.to(device=weight.device, dtype=weight.dtype)
            expected = torch.addmm(bias, probe, weight)
            answer = bool(torch.allclose(module(probe), expected, rtol=1e-4, atol=1e-5))
    except Exception:
        answer = False
    object.__setattr__(module, "_accel_transposed_linear", (tuple(weight.shape), answer))
    return answer


def _prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: a module and the modules that contain it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))] if name else [""]


def _names_module(pattern: str, module_name: str) -> bool:
    """Whether ``pattern`` names the module ``module_name`` or a module that contains it."""
    return any(fnmatchcase(prefix, pattern) for prefix in _prefixes(module_name))


def _is_parameter_pattern(pattern: str, parameter_names: Iterable[str]) -> bool:
    """A pattern whose last dotted part is a literal parameter name (``*.in_proj_weight``, ``head.weight``)."""
    leaf = pattern.rsplit(".", 1)[-1]
    if not leaf or _GLOB_CHARACTERS & set(leaf):
        return False
    return any(name.rsplit(".", 1)[-1] == leaf and fnmatchcase(name, pattern) for name in parameter_names)


def _check_patterns_match(argument: str, patterns: Sequence[str] | None, candidates: Sequence[str], owner: str) -> None:
    """Raise ``ValueError`` for a pattern that names nothing, listing names that exist."""
    for pattern in patterns or ():
        if not any(fnmatchcase(prefix, pattern) for name in candidates for prefix in _prefixes(name)):
            shown = ", ".join(repr(name) for name in candidates[:8])
            more = f" and {len(candidates) - 8} more" if len(candidates) > 8 else ""
            raise ValueError(
                f"{owner}: the `{argument}` pattern {pattern!r} matches no module or parameter. Patterns name "
                f"modules ('head', 'encoder.*') or parameters ('*.in_proj_weight'); this model has {shown}{more}"
            )


def _all_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, by tensor identity: tied parameters have several names."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def default_weight_names(model: nn.Module) -> set[str]:
    """Every weight matrix a Linear, a transposed Linear, a (transposed) Conv, a recurrent layer or an attention uses.

    A transposed Linear is GPT-2's ``Conv1D``, recognised from what it computes (:func:`is_transposed_linear`).

    ``nn.MultiheadAttention`` keeps its Q/K/V projection as a bare parameter (``in_proj_weight``, or
    ``q/k/v_proj_weight`` when the dimensions differ), not as a Linear, so it is named here explicitly; its
    ``out_proj`` is a Linear and is covered as such.
    """
    names = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (*WEIGHT_MODULE_TYPES, nn.modules.conv._ConvTransposeNd)) or is_transposed_linear(module):
            names.add(f"{prefix}weight")
        elif isinstance(module, nn.RNNBase):  # the gate matrices; biases stay
            names.update(f"{prefix}{name}" for name, p in module.named_parameters(recurse=False) if p.dim() >= 2)
        elif isinstance(module, nn.MultiheadAttention):
            for attribute in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attribute, None) is not None:
                    names.add(f"{prefix}{attribute}")
    return names


def select_weights(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    owner: str = "MagnitudePruning",
) -> dict[str, nn.Parameter]:
    """Select the weights to prune.

    Args:
        model: The model.
        include: Patterns naming modules (their Linear/Conv/attention weights are selected) or parameters.
            ``None`` selects every trained (``requires_grad``) weight of an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or
            ``nn.MultiheadAttention`` projection: a frozen weight cannot recover from pruning, so it is pruned only
            when a pattern names it.
        exclude: Patterns naming modules or parameters to leave out.
        owner: The callback named in errors.

    Returns:
        Selected parameters by name, in ``named_parameters()`` order. A tied parameter appears once, under its
        first name, and is selected when any of its names is.

    Raises:
        ValueError: when a pattern matches no module or parameter name.
    """
    names_by_id = _all_parameter_names(model)
    parameter_names = [name for names in names_by_id.values() for name in names]
    module_names = [name for name, _ in model.named_modules() if name]
    _check_patterns_match("include", include, module_names + parameter_names, owner)
    _check_patterns_match("exclude", exclude, module_names + parameter_names, owner)
    default = default_weight_names(model)

    def named_by(patterns: Sequence[str], name: str) -> bool:
        module_name = name.rpartition(".")[0]
        for pattern in patterns:
            if _is_parameter_pattern(pattern, [name]):
                return True
            if name in default and (_names_module(pattern, module_name) or fnmatchcase(name, pattern)):
                return True
        return False

    selected = {}
    for name, parameter in model.named_parameters():
        aliases = names_by_id[id(parameter)]
        if include is None:  # frozen weights cannot recover from pruning: only when named
            chosen = parameter.requires_grad and any(a in default for a in aliases)
        else:
            chosen = any(named_by(include, a) for a in aliases)
        if chosen and not (exclude and any(named_by(exclude, a) for a in aliases)):
            selected[name] = parameter
    return selected


def select_modules(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = WEIGHT_MODULE_TYPES,
    owner: str = "QuantizationAwareTraining",
) -> dict[str, nn.Module]:
    """Select modules of ``types`` by name.

    Args:
        model: The model.
        include: Patterns naming modules (a module and everything inside it); ``None`` selects every module of
            ``types``. A pattern matching a module's parameters (``"head.*"``, ``"head.weight"``) selects it too.
        exclude: Patterns naming modules to leave out.
        types: Only modules of these types are candidates.
        owner: The callback named in errors.

    Returns:
        Selected modules by name, in ``named_modules()`` order.

    Raises:
        ValueError: when a pattern matches no module or parameter name.
    """
    module_names = [name for name, _ in model.named_modules() if name]
    parameter_names = [name for name, _ in model.named_parameters()]
    _check_patterns_match("include", include, module_names + parameter_names, owner)
    _check_patterns_match("exclude", exclude, module_names + parameter_names, owner)

    def named_by(patterns: Sequence[str], name: str, module: nn.Module) -> bool:
        own_parameters = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        return any(
            _names_module(pattern, name) or any(fnmatchcase(p, pattern) for p in own_parameters) for pattern in patterns
        )

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, types)
        and (include is None or named_by(include, name, module))
        and not (exclude and named_by(exclude, name, module))
    }


def unpruned_weight_holders(model: nn.Module, default: set[str], limit: int = 6) -> str:
    """Name the trained weight matrices that the default selection leaves dense, grouped by the reason.

    Nothing is left out without a word (for the selection summary): embeddings, and layers whose computation is not
    one of the recognised matrix products (GPT-2's ``Conv1D`` is one), are named so that a pattern can take them.
    """
    by_reason: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        left = [
            f"{prefix}{name}"
            for name, p in module.named_parameters(recurse=False)
            if p.dim() >= 2 and p.requires_grad and f"{prefix}{name}" not in default
        ]
        if not left:
            continue
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            reason = "embeddings (a lookup table: name it, e.g. 'embed.weight', to prune it)"
        else:
            reason = (
                f"weights of layers that are not Linear/Conv/LSTM/GRU/attention ({type(module).__name__}; name the "
                "parameter to prune it)"
            )
        by_reason.setdefault(reason, []).extend(left)
    text = ""
    for reason, names in by_reason.items():
        more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
        text += f"; left dense by default, {reason}: {', '.join(names[:limit])}{more}"
    return text


def describe_selection(include: Sequence[str] | None, exclude: Sequence[str] | None) -> str:
    """Describe include/exclude patterns for an error message."""
    what = f"include={include!r}" if include is not None else "include=None (every Linear/Conv weight)"
    return f"{what}, exclude={exclude!r}"


def summarize_selection(selected: Iterable[str], candidates: Iterable[str], limit: int = 6) -> str:
    """A short text of what was selected and what was left out, for the log at setup."""
    selected, candidates = list(selected), list(candidates)
    left_out = [name for name in candidates if name not in selected]

    def shown(names: list[str]) -> str:
        return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")

    text = f"{len(selected)} selected: {shown(selected) or 'none'}"
    if left_out:
        text += f"; left out by include/exclude: {shown(left_out)}"
    return text


def module_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that runs its own class's ``forward``, also when ``torch.compile`` wrapped it.

    Lightning's ``fit(torch.compile(model))`` replaces the module's ``forward`` by the compiled function of the
    *original* module (``from_compiled``). A plain deep copy keeps that instance attribute, so calling the copy ran
    the original: a calibration copy observed nothing, and an export traced the wrong weights. Exports, calibration
    and checks work on copies without it; the training module keeps its compiled forward.
    """
    duplicate = copy.deepcopy(module)
    for submodule in duplicate.modules():
        if "_compiler_ctx" in submodule.__dict__ or hasattr(
            submodule.__dict__.get("forward"), "_torchdynamo_orig_callable"
        ):
            submodule.__dict__.pop("forward", None)
            submodule.__dict__.pop("_compiler_ctx", None)
    return duplicate


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's device, else its first buffer's, else the CPU."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
