"""AdapterPlan: everything a model's adapters are doing, held in one place.

One plan per adapted model (``model._diffadapt``). It holds the state -- the adapters' configs,
which of them run and in which order with which strengths, which are merged into the base
weights, whether adapters are disabled -- and derives everything else from it:

* what each layer computes: ``live`` = the chosen adapters with a non-zero strength that are
  not merged, in activation order; merged adapters are always the innermost ones (a suffix of
  the order), so the live forward and the merged weights compute one function;
* the per-step factors of every layer, prepared **once per forward of the model** and **batched
  per shape group** (:meth:`Method.prepare_many`): a forward pre-hook on the model prepares all
  layers before the first one runs, each :class:`~diffadapt.host.AdapterHost` reads its slice.
  The factors are built outside any checkpointed block, so gradient checkpointing recomputes
  the layers with the very same factors and their gradients reach the parameters once;
* reuse in eval: in eval mode without autograd, prepared factors -- and each layer's effective
  weight, one copy per adapted layer (``keep_eval_weights``) -- are kept while no parameter
  (version counter, storage) and no strength changed, so generating with a live adapter costs
  about what the base model costs; an optimizer step, a hot-swap, ``load_state_dict`` or a
  strength change invalidates them. Under ``torch.compile`` the factors are rebuilt inside the
  graph and activations are rotated (no kept weights);
* strengths as 0-d tensors (one per adapter and device): changing a non-zero strength updates
  them in place, so a compiled model does not recompile.

Hosts keep no adapter state of their own, only their parameters and the original base weight
while merged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn

from diffadapt import quantized_layers as quantized
from diffadapt.host import AdapterHost, SavedModuleHost
from diffadapt.methods import AdapterConfig, get_method


def _mark_static(value: Any) -> None:
    """Pin the shapes of prepared factors read by a compiled layer: they come from the plan's
    Python state, so dynamo sees them as inputs of the model's graph, and after any recompile of
    the same code (another model, another adapter) its automatic dynamic shapes would compile the
    layers with symbolic sizes -- 7x the compile time for BOFT's view arithmetic, and slower
    kernels. Shapes are fixed by the adapters' configs; a new shape is a recompile, as for
    parameters (``force_parameter_static_shapes``)."""
    if isinstance(value, torch.Tensor):
        torch._dynamo.mark_static(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _mark_static(item)
    elif isinstance(value, dict):
        for item in value.values():
            _mark_static(item)


class AdapterPlan:
    """diffadapt's record on one model (see module docstring)."""

    def __init__(self, requires_grad: dict[str, bool]):
        self.configs: dict[str, AdapterConfig] = {}
        self.order: list[tuple[str, float]] = []  # chosen adapters, activation order, strengths
        self.merged: list[str] = []  # baked into the base weights: the innermost live adapters
        self.disabled = False
        self.keep_eval_weights = True  # in eval without autograd, layers keep W_eff (one copy each)
        self.weights_kept = False  # some layer holds such a copy now
        self.requires_grad = requires_grad  # base parameters' flags before injection (unload restores)
        self.hosts: list = []  # AdapterHost modules of the model, in module order
        self.saved_hosts: list = []  # SavedModuleHost modules
        self._hook = None
        self._strengths: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._live: list[str] = []
        self._groups: Optional[list] = None  # cached batching of the live slots
        self._other_groups: Optional[tuple] = None  # (names, batching) of the last other set (merged)
        self._steps: Optional[list[list[tuple[Any, Any]]]] = None  # per host: (method, factors), live order
        self._key: Any = None  # what the prepared steps were made for (eager mode)
        self._baked: tuple[list[str], list] = ([], [])  # merged names and order of the last bake
        self._bake_cache: Optional[tuple] = None  # (what, per-host steps) of the last merge's factors
        self._accepted_quantized: set = set()  # (adapter, strength) merges into quantized layers done before

    # -- what runs ------------------------------------------------------------------------------
    def live(self) -> list[str]:
        """Adapters that run on the activations, in activation order (fixed between structural
        changes, so a compiled graph guards on names only, never on strength values)."""
        return self._live

    def _compute_live(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n, s in self.order if s != 0.0 and n not in self.merged]

    def strength(self, name: str) -> float:
        return dict(self.order)[name]

    def changed(self) -> None:
        """What runs changed (adapters, order, merge state): regroup now (never inside a compiled
        graph) and re-prepare at the next forward."""
        self._live = self._compute_live()
        self._groups = self.groups(self._live)
        self._other_groups = None
        self._steps = None
        self._key = None
        for host in self.hosts:
            host.clear_cache()

    def attach(self, model: nn.Module) -> None:
        """Find the model's hosts (after modules were swapped) and hook its forward."""
        self.hosts, self.saved_hosts = [], []
        for _, module in model.named_modules():
            if isinstance(module, AdapterHost):
                module.plan, module.index = self, len(self.hosts)
                self.hosts.append(module)
            elif isinstance(module, SavedModuleHost):
                module.plan = self
                self.saved_hosts.append(module)
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._before_forward)
        self.changed()

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for host in self.hosts + self.saved_hosts:
            host.plan = None
        self.hosts, self.saved_hosts = [], []
        self.changed()

    # -- strengths ------------------------------------------------------------------------------
    def set_order(self, order: list[tuple[str, float]]) -> None:
        """New choice of adapters; when only non-zero strengths change, the strength tensors are
        updated in place and nothing is regrouped (no recompilation)."""
        structural = [(n, s != 0.0) for n, s in order] != [(n, s != 0.0) for n, s in self.order]
        self.order = list(order)
        values = dict(order)
        with torch.no_grad():
            for (name, _), tensor in self._strengths.items():
                if name in values:
                    tensor.fill_(values[name])
        if structural:
            self.changed()
        self._key = None  # prepared factors carry the old strengths

    def strength_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        t = self._strengths.get(key)
        if t is None:
            # float64: a 0-d tensor does not promote the factors' dtype, and float32 math rounds the
            # value as it would a Python float (MPS has no float64)
            dtype = torch.float32 if device.type == "mps" else torch.float64
            t = self._strengths[key] = torch.tensor(self.strength(name), dtype=dtype, device=device)
        return t

    def forget(self, name: str) -> None:
        self._bake_cache = None
        for key in [k for k in self._strengths if k[0] == name]:
            del self._strengths[key]

    # -- preparation ------------------------------------------------------------------------------
    def groups(self, names: list[str]) -> list[tuple[str, Any, AdapterConfig, list[int], list, torch.Tensor]]:
        """``(adapter, method, config, host indices, slots, strength)`` per batch of layers: the
        slots of one adapter with the same per-layer config and :meth:`Method.stack_key`."""
        out = []
        for name in names:
            method = get_method(self.configs[name].method)
            batches: dict[Any, tuple[list[int], list]] = defaultdict(lambda: ([], []))
            for host in self.hosts:
                slot = host.adapters[name] if name in host.adapters else None
                if slot is not None:
                    key = (id(slot.config), method.stack_key(slot.params(), slot.buffers_dict()))
                    batches[key][0].append(host.index)
                    batches[key][1].append(slot)
            for idx, slots in batches.values():
                device = next(iter(slots[0].params().values())).device
                out.append((name, method, slots[0].config, idx, slots, self.strength_tensor(name, device)))
        return out

    def prepare(self, names: list[str], training: bool) -> list[list[tuple[Any, Any]]]:
        """Per host, ``(method, factors)`` of ``names`` present on it, in the order of ``names``."""
        compiling = torch.compiler.is_compiling()
        if compiling or names == self._live:
            groups = self._groups
        else:  # the merged adapters (bake): grouped once per structure too
            if self._other_groups is None or self._other_groups[0] != names:
                self._other_groups = (list(names), self.groups(names))
            groups = self._other_groups[1]
        steps: list[list[tuple[Any, Any]]] = [[] for _ in self.hosts]
        for name, method, config, indices, slots, strength in groups:
            params = [slot.params() for slot in slots]
            if not compiling:  # the model may have moved since grouping
                strength = self.strength_tensor(name, next(iter(params[0].values())).device)
            preps = method.prepare_many(config, params, [slot.buffers_dict() for slot in slots], strength, training)
            for i, prep in zip(indices, preps):
                steps[i].append((method, prep))
        return steps

    def _versions(self) -> tuple:
        """Version counter and storage of every live parameter (what reused factors depend on)."""
        return tuple(
            (p._version, p.data_ptr()) for *_, slots, _ in self._groups for slot in slots for p in slot.parameters()
        )

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.ensure_prepared(module.training, fresh=True)

    def ensure_prepared(self, training: bool, fresh: bool = False) -> None:
        """Prepare every live layer for this forward. ``fresh`` (a new forward of the model):
        with autograd the factors are always rebuilt (the last graph is gone after backward);
        without, they are reused while parameters and strengths are unchanged."""
        if not self.hosts:
            return
        if torch.compiler.is_compiling():  # inside the graph: no Python-side caching
            self._steps = self.prepare(self.live(), training)
            return
        grad = torch.is_grad_enabled()
        if grad and self.weights_kept:  # training again (e.g. after a validation run): drop the eval copies
            for host in self.hosts:
                host.clear_cache()
            self.weights_kept = False
        if self._steps is not None and self._key is not None and self._key[:2] == (training, grad):
            if not fresh:
                return
            if not grad and not training and self._key[2] == self._versions():
                return  # eval: reuse (training mode draws new dropout every forward)
        self._steps = self.prepare(self.live(), training)
        self._key = (training, grad, None if grad else self._versions())

    def steps_for(self, host) -> list[tuple[Any, Any]]:
        """The live ``(method, factors)`` of ``host`` (prepared now if the model's forward hook did
        not run, e.g. when a submodule is called on its own)."""
        compiling = torch.compiler.is_compiling()
        if self._steps is None or (not compiling and self._key is None):
            self.ensure_prepared(host.training)
        steps = self._steps[host.index]
        if compiling:
            for _, prep in steps:
                _mark_static(prep)
        return steps

    # -- merged weights -------------------------------------------------------------------------
    @torch.no_grad()
    def bake(self) -> None:
        """Write the merged adapters into every host's base weight (from its kept original)."""
        names = [] if self.disabled else list(self.merged)
        steps = self._merge_steps(names) if names else [[] for _ in self.hosts]
        requantized = self._plan_quantized(names, steps)  # may refuse: before anything is written
        back = [h for h, chain in zip(self.hosts, steps) if not chain and h.original_weight is not None]
        copied = [h for h in back if not h.swapped]  # (a swapped one gets its own tensor back, no copy)
        if copied:  # every copying restore in one foreach copy
            torch._foreach_copy_([h.base_layer.weight for h in copied], [h.original_weight for h in copied])
            for host in copied:
                host.original_weight = None
        for host in back:
            host.restore()
        for host, chain in zip(self.hosts, steps):
            if host.index in requantized:
                host.bake_quantized(requantized[host.index])
            elif chain and host.quantized:
                host.bake(chain)
            elif not chain and host.quant_original is not None:
                host.restore()
        AdapterHost.bake_many([(h, chain) for h, chain in zip(self.hosts, steps) if chain and not h.quantized])
        self._key = None  # base weights changed under any cached factors' users
        self._baked = (list(names), list(self.order))
        if requantized:
            self._accepted_quantized |= {(n, self.strength(n)) for n in names}
            quantized.warn_merged([r for _, r in requantized.values()])

    def _merge_steps(self, names: list[str]) -> list[list[tuple[Any, Any]]]:
        """The factors of the adapters to merge, reused from the last merge while the same adapters,
        strengths, layers and parameter versions stand (switching by merge / unmerge prepares once)."""
        what = (
            tuple(names), tuple(self.strength(n) for n in names),
            tuple((h.index, n, t._version, t.data_ptr()) for h in self.hosts for n in names if n in h.adapters
                  for t in (*h.adapters[n].params().values(), *h.adapters[n].buffers_dict().values())),
        )
        if self._bake_cache is None or self._bake_cache[0] != what:
            self._bake_cache = (what, self.prepare(names, False))
        return self._bake_cache[1]

    def _plan_quantized(self, names: list[str], steps: list) -> dict:
        """Host index -> (requantized storage, report) for the quantized hosts to merge into. A merge
        of adapters (at strengths) not accepted before whose requantization error is above the limit
        (:mod:`diffadapt.quantized`) is refused: the plan goes back to what the weights hold (the last
        bake) and QuantizedMergeError says what to do instead."""
        todo = [(h, chain) for h, chain in zip(self.hosts, steps) if chain and h.quantized]
        if not todo:
            return {}
        plans = {h.index: h.plan_quantized_merge(chain) for h, chain in todo}
        new = [n for n in names if (n, self.strength(n)) not in self._accepted_quantized]
        reason = quantized.refusal([r for _, r in plans.values()], quantized.merge_limit(self), names) if new else None
        if reason is not None:
            baked, order = self._baked
            was, current = dict(order), [(n, s) for n, s in self.order if s != 0.0]
            if current[len(current) - len(baked):] != [(n, was[n]) for n in baked]:
                self.set_order(order)  # a refused merge-switch: back to the order the weights were baked for
            self.merged = list(baked)
            self.changed()
            raise quantized.QuantizedMergeError(reason)
        return plans
