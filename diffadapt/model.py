"""Model-level adapter API: add, activate with strengths, merge, unmerge, delete, unload.

All functions take the (diffusers or transformers) model itself and change it in place, like
diffusers' LoRA verbs. What diffadapt knows about a model lives in ``model._diffadapt``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from diffadapt.host import SUPPORTED_LAYERS, AdapterHost, AdapterSlot, SavedModuleHost, SharedState, layer_spec, weight_2d
from diffadapt.methods import AdapterConfig, AdapterConfigError, LayerSpec, Method, get_method
from diffadapt.methods.base import pattern_matches
from diffadapt.plan import AdapterPlan
from diffadapt.targets import inside_wrapper, preset_pattern, select_targets

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)

def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (every verb acts on it), else ``model``."""
    return getattr(model, "_orig_mod", model)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a ``torch.compile`` wrapper holds) carries diffadapt adapters."""
    return "_diffadapt" in unwrap(model).__dict__


def adapter_config(model: nn.Module, adapter_name: str) -> Optional[AdapterConfig]:
    """The config of ``adapter_name`` on ``model``, or None if the model has no such adapter."""
    state = unwrap(model).__dict__.get("_diffadapt")
    return state.configs.get(adapter_name) if state is not None else None


def adapter_state(model: nn.Module) -> AdapterPlan:
    model = unwrap(model)
    state = model.__dict__.get("_diffadapt")
    if state is None:
        raise ValueError(f"This {type(model).__name__} has no diffadapt adapters; add or load one first.")
    return state


def _hosts(model: nn.Module) -> tuple[list, list]:
    model = unwrap(model)
    state = model.__dict__.get("_diffadapt")
    if state is not None:
        return state.hosts, state.saved_hosts
    found = ([], [])
    for _, m in model.named_modules():
        if isinstance(m, AdapterHost):
            found[0].append(m)
        elif isinstance(m, SavedModuleHost):
            found[1].append(m)
    return found


def hosts(model: nn.Module) -> list[tuple[str, AdapterHost]]:
    """``(module path, host)`` of every adapted layer (read from the plan: no module walk)."""
    return [(h.spec.name, h) for h in _hosts(model)[0]]


def saved_module_hosts(model: nn.Module) -> list[tuple[str, SavedModuleHost]]:
    return [(h.name, h) for h in _hosts(model)[1]]


def select_saved_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths named by ``config.modules_to_save`` (trainable full copies per adapter)."""
    if not config.modules_to_save:
        return []
    names = []
    for name, module in model.named_modules():
        if inside_wrapper(name):
            continue
        if any(pattern_matches(p, name) for p in config.modules_to_save):
            names.append(name)
    missing = [p for p in config.modules_to_save if not any(pattern_matches(p, n) for n in names)]
    if missing:
        raise AdapterConfigError(f"modules_to_save {missing} match no module of this {type(model).__name__}.")
    return names


def _module(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, AdapterHost) else module


def check_adapter_name(model: nn.Module, adapter_name: str) -> None:
    """A valid name, not yet used on ``model`` (else ValueError saying what to do)."""
    state = unwrap(model).__dict__.get("_diffadapt")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"Adapter names are non-empty strings without '.', got {adapter_name!r}.")
    if state is not None and adapter_name in state.configs:
        raise ValueError(
            f"This {type(model).__name__} already has an adapter named {adapter_name!r}; pick another "
            "adapter_name or delete_adapter() it first."
        )


def resolve_targets(model: nn.Module, config: AdapterConfig, preset: Optional[str] = None) -> AdapterConfig:
    """Fill ``target_modules`` from ``preset`` (default 'attention' for known architectures)."""
    if preset is not None and config.target_modules is not None:
        raise AdapterConfigError("Give either a preset or target_modules, not both.")
    if config.target_modules is None:
        return dataclasses.replace(config, target_modules=preset_pattern(model, preset or "attention"))
    return config


def build_slots(
    model: nn.Module,
    config: AdapterConfig,
    names: Sequence[str],
    shared: Optional[Callable[[list[LayerSpec], list[torch.Tensor]], list[dict[str, torch.Tensor]]]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, AdapterSlot]:
    """Create (without installing) one AdapterSlot per module name. Raises before any change.

    ``device="meta"`` builds shape-only slots from the weights' shapes (nothing is allocated).
    ``shared(specs, weights)`` gives the method's shared state instead of ``init_shared`` (e.g.
    FRoD's bases read from a file). Layers are
    handed to the method in the model's module order, whatever order ``names`` has (PEFT's FRoD
    bases depend on it)."""
    method = get_method(config.method)
    wanted = set(names)
    ordered = [n for n, _ in model.named_modules(remove_duplicate=False) if n in wanted]
    names = list(dict.fromkeys(ordered + list(names)))  # names the model lacks fail below, named
    modules = [_module(model, n) for n in names]
    specs = [layer_spec(n, m) for n, m in zip(names, modules)]
    configs = [config.for_layer(n) for n in names]
    for cfg, spec in zip(configs, specs):
        cfg.check_layer(spec)
    weights = [weight_2d(m).detach() if device is None else weight_2d(m).detach().to(device) for m in modules]
    states = method.init_shared(config, specs, weights) if shared is None else shared(specs, weights)
    shared_modules: dict[int, SharedState] = {}
    slots = {}
    for name, cfg, spec, weight, common in zip(names, configs, specs, weights, states):
        params, buffers = method.init_layer(cfg, spec, weight, common)
        if weight.dtype in _LOW_PRECISION:  # train adapters in fp32, like PEFT's autocast_adapter_dtype
            params = {k: v.float() for k, v in params.items()}
        holder = None
        if common:
            holder = shared_modules.setdefault(id(common), SharedState(common))
        slots[name] = AdapterSlot(method, cfg, params, buffers, holder)
    return slots


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def install_slots(
    model: nn.Module,
    adapter_name: str,
    config: AdapterConfig,
    slots: dict[str, AdapterSlot],
    saved_modules: Optional[dict[str, Optional[dict[str, torch.Tensor]]]] = None,
) -> None:
    """Put built slots (and ``modules_to_save`` copies, with saved values if given) into the
    model (nothing here can fail half-way) and make the adapter the active one. New modules
    follow the model's train/eval mode (no adapter dropout while generating)."""
    state = model.__dict__.get("_diffadapt")
    if state is None:
        state = AdapterPlan(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__["_diffadapt"] = state
    for name, slot in slots.items():
        module = model.get_submodule(name)
        if not isinstance(module, AdapterHost):
            module = AdapterHost(module, name).train(model.training)
            _swap(model, name, module)
        module.add(adapter_name, slot.train(model.training))
    copies = []
    for name, values in (saved_modules or {}).items():
        module = model.get_submodule(name)
        if not isinstance(module, SavedModuleHost):
            module = SavedModuleHost(module, name).train(model.training)
            _swap(model, name, module)
        copies.append(module.add(adapter_name).train(model.training))
        if values is not None:
            copies[-1].load_state_dict(values)
    state.configs[adapter_name] = config
    state.attach(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [*slots.values(), *copies]:
        for p in module.parameters():
            p.requires_grad_(True)
    set_adapters(model, adapter_name)


def add_adapter(
    model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, preset: Optional[str] = None
) -> list[str]:
    """Inject a new adapter described by ``config``; returns the adapted module names.

    Without ``target_modules`` the architecture's ``preset`` is used ('attention' by default;
    'attention+ff' adds the feed-forward layers). Injection is atomic: if any layer fails
    validation or initialisation the model is left exactly as it was. The new adapter becomes
    the active one and the only trainable parameters are its own. A ``torch.compile``d model is
    adapted through the module it wraps (names without ``_orig_mod.``, files that load anywhere).
    """
    model = unwrap(model)
    check_adapter_name(model, adapter_name)
    config = resolve_targets(model, config, preset)
    names = select_targets(model, config, SUPPORTED_LAYERS)
    saved = select_saved_modules(model, config)
    slots = build_slots(model, config, names)
    install_slots(model, adapter_name, config, slots, {n: None for n in saved})
    logger.info("added adapter %r (%s) to %d layers of %s", adapter_name, config.method, len(names), type(model).__name__)
    return names


def _names_and_weights(
    state: AdapterPlan, adapter_names: Union[str, Sequence[str]], weights
) -> list[tuple[str, float]]:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; this model has {sorted(state.configs)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Adapter names repeat in {names}.")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"Got {len(weights)} strengths for {len(names)} adapters {names}.")
    check_strengths(names, weights)
    return [(n, float(w)) for n, w in zip(names, weights)]


def check_strengths(names: Sequence[str], weights: Sequence) -> None:
    """Strengths are finite real numbers (NaN / inf would give black images without an error)."""
    for n, w in zip(names, weights):
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) or (isinstance(w, torch.Tensor) and w.numel() == 1)
        if not ok or not math.isfinite(float(w)):
            raise ValueError(f"Strength of adapter {n!r} must be a finite number, got {w!r}.")


def set_adapters(
    model: nn.Module,
    adapter_names: Union[str, Sequence[str]],
    weights: Union[float, Sequence[float], None] = None,
    order: str = "diffadapt",
) -> None:
    """Activate ``adapter_names`` (activation order) with strengths ``weights`` (default 1).

    Strength 0 is the base model exactly, 1 the trained adapter; see each method for values in
    between. If the model is merged, the new choice is merged instead (a merge-switch). Changing
    only non-zero strengths touches no module, so a ``torch.compile``d model does not recompile.
    ``order="peft"``: the names are in PEFT's ``set_adapter`` order and give PEFT's function
    (PEFT composes several HRA or BOFT adapters the other way round; one method only, as in PEFT).
    """
    state = adapter_state(model)
    chosen = _names_and_weights(state, adapter_names, weights)
    if order == "peft":
        chosen = _peft_order(state, chosen)
    elif order != "diffadapt":
        raise ValueError(f"set_adapters: order={order!r}; choose 'diffadapt' or 'peft'.")
    if not state.merged:
        state.set_order(chosen)
        return
    names = [n for n, s in chosen if s != 0.0]
    # all merged: a merge-switch; a partial merge stays partial (the same adapters, if still chosen)
    merged = names if not state.live() else [n for n in names if n in state.merged]
    _check_merge(state, names, merged)
    before = [(n, state.strength(n)) for n in state.merged]
    state.set_order(chosen)
    if merged != state.merged or before != [(n, state.strength(n)) for n in merged]:
        state.merged = merged
        state.changed()
        state.bake()


def _peft_order(state: AdapterPlan, chosen: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """``chosen`` in PEFT's set_adapter order -> diffadapt's order with PEFT's function."""
    methods = {state.configs[n].method for n, _ in chosen}
    if len(methods) > 1:
        raise ValueError(
            f"set_adapters(order='peft'): {[n for n, _ in chosen]} mix methods {sorted(methods)}; PEFT activates "
            "adapters of one tuner only. Give diffadapt's order (order='diffadapt') for mixed methods."
        )
    return chosen[::-1] if methods and get_method(methods.pop()).peft_reverses_order else chosen


def _check_merge(state: AdapterPlan, order: list[str], merged: list[str]) -> None:
    """Merged adapters act innermost: refuse a merge that would change the function."""
    rest = [n for n in order if n not in merged]
    additive = all(not get_method(state.configs[n].method).multiplicative for n in order)
    if rest and merged and order.index(merged[0]) < order.index(rest[-1]) and not additive:
        raise ValueError(
            f"Cannot merge {merged} alone: merged adapters act innermost, but in the activation order {order} "
            f"{rest[-1]!r} comes after {merged[0]!r} and rotations do not commute, so the model would compute "
            f"another function. Merge the last adapters of the order ({order[len(order) - len(merged):]}), all of "
            "them, or reorder with set_adapters first."
        )


def set_adapter_strength(model: nn.Module, adapter_name: str, strength: float) -> None:
    """Change one active adapter's strength (the others keep theirs)."""
    state = adapter_state(model)
    if adapter_name not in [n for n, _ in state.order]:
        raise ValueError(f"Adapter {adapter_name!r} is not active; active: {[n for n, _ in state.order]}.")
    set_adapters(model, [n for n, _ in state.order], [strength if n == adapter_name else s for n, s in state.order])


def active_adapters(model: nn.Module) -> list[tuple[str, float]]:
    state = model.__dict__.get("_diffadapt")
    return [] if state is None or state.disabled else list(state.order)


def list_adapters(model: nn.Module) -> dict[str, dict]:
    """name -> method, number of layers, number of parameters, strength if active."""
    state = adapter_state(model)
    info = {n: {"method": c.method, "layers": 0, "parameters": 0, "strength": None} for n, c in state.configs.items()}
    for n, s in state.order:
        info[n]["strength"] = s
    for _, host in hosts(model):
        for n, slot in host.adapters.items():
            info[n]["layers"] += 1
            info[n]["parameters"] += sum(p.numel() for p in slot.parameters())
    return info


def disable_adapters(model: nn.Module) -> None:
    """Run the base model (merged weights are restored first; enable_adapters bakes them again)."""
    state = adapter_state(model)
    state.disabled = True
    state.changed()
    state.bake()


def enable_adapters(model: nn.Module) -> None:
    state = adapter_state(model)
    state.disabled = False
    state.changed()
    state.bake()


def merge_adapters(model: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Bake the active adapters (or the chosen active ones) into the base weights.

    Merged adapters are the innermost ones: a partial merge must be the last adapters of the
    activation order (or all adapters additive, which commute), else it would change the function
    and is refused. Adapters merged earlier stay merged.
    """
    state = adapter_state(model)
    if adapter_names is not None:
        _names_and_weights(state, adapter_names, None)
    order = [n for n, s in state.order if s != 0.0]
    chosen = set(order if adapter_names is None else adapter_names) | set(state.merged)
    merged = [n for n in order if n in chosen]
    _check_merge(state, order, merged)
    if merged == state.merged:
        return
    state.merged = merged
    state.changed()
    state.bake()


def unmerge_adapters(model: nn.Module) -> None:
    """Restore every base weight bit for bit; merged adapters run live again."""
    state = adapter_state(model)
    if not state.merged:
        return
    state.merged = []
    state.changed()
    state.bake()


def set_keep_eval_weights(model: nn.Module, keep: bool) -> None:
    """In eval mode without autograd each adapted layer keeps its effective weight (one copy of
    the layer's weight) so that generating with live adapters costs about the base model's time.
    ``False`` drops the copies and computes adapters on the activations (less memory, slower);
    ``merge_adapters`` is as fast and needs no copy."""
    state = adapter_state(model)
    state.keep_eval_weights = bool(keep)
    for host in state.hosts:
        host.clear_cache()


def refresh_merged(model: nn.Module) -> None:
    """Re-bake merged adapters after their parameters changed in place (hot-swap)."""
    state = adapter_state(model)
    if state.merged:
        state.bake()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    state = adapter_state(model)
    _names_and_weights(state, adapter_name, None)
    state.merged = [n for n in state.merged if n != adapter_name]
    state.bake()
    for name, host in hosts(model):
        if adapter_name in host.adapters:
            del host.adapters[adapter_name]
            if not host.adapters:
                _swap(model, name, host.base_layer)
    for name, host in saved_module_hosts(model):
        if adapter_name in host.copies:
            del host.copies[adapter_name]
            if not host.copies:
                _swap(model, name, host.original_module)
    del state.configs[adapter_name]
    state.order = [(n, s) for n, s in state.order if n != adapter_name]
    state.forget(adapter_name)
    if not state.configs:
        unload(model)
        return
    state.attach(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter: the original modules go back, weights bit-identical."""
    state = model.__dict__.get("_diffadapt")
    for name, host in hosts(model):
        host.restore()
        _swap(model, name, host.base_layer)
    for name, host in saved_module_hosts(model):
        _swap(model, name, host.original_module)
    if state is not None:
        state.detach()
        for n, p in model.named_parameters():
            p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
        del model.__dict__["_diffadapt"]
    return model


class LayerAdapter(NamedTuple):
    """One adapted layer's part of one adapter, as the faces (exporters) read it."""

    path: str  # module path
    spec: LayerSpec
    method: type[Method]
    config: AdapterConfig  # this layer's (overrides applied)
    params: dict[str, torch.Tensor]  # the live parameters
    buffers: dict[str, torch.Tensor]
    weight_shape: tuple[int, ...]  # the module's weight, as the module stores it
    base_weight: Callable[[], torch.Tensor]  # the layer's own weight without any adapter (kept original while merged)
    apply: Callable[[torch.Tensor, float], torch.Tensor]  # 2-D weight -> that weight under this adapter alone at a strength


def layer_adapters(model: nn.Module, adapter_name: str) -> list[LayerAdapter]:
    """Every layer ``adapter_name`` adapts on ``model``, in model order (empty if none)."""
    out = []
    for name, host in hosts(model):
        slot = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if slot is None:
            continue
        out.append(LayerAdapter(
            name, host.spec, slot.method, slot.config, slot.params(), slot.buffers_dict(),
            tuple(host.base_layer.weight.shape), host.base_weight,
            lambda weight, strength, slot=slot: slot.method.apply_to_weight(weight, slot.prepare(strength, False)),
        ))
    return out


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """``{"<module path>.<param>": parameter}`` of one adapter (the live tensors), including
    its ``modules_to_save`` copies (``<module path>.<param path>``)."""
    out = {}
    for name, host in hosts(model):
        slot = host.adapters[adapter_name] if adapter_name in host.adapters else None
        if slot is not None:
            for key, value in slot.params().items():
                out[f"{name}.{key}"] = value
    for name, host in saved_module_hosts(model):
        if adapter_name in host.copies:
            for key, value in host.copies[adapter_name].named_parameters():
                out[f"{name}.{key}"] = value
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
