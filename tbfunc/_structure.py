"""What is derived from a module's structure, kept until the structure moves (private).

Torch's global registration hooks bump one counter whenever a parameter, buffer or submodule is
registered or assigned anywhere; every cache here stores the counter with its value and is
read again only while the counter is unchanged. Under ``torch.compile`` nothing here is read or
written: dynamo would turn the counter into a guard and recompile on every module created.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "ATTENTION",
    "FACTS",
    "GENERATION",
    "LAYERS",
    "MATCHES",
    "SLOTS",
    "Facts",
    "module_facts",
    "module_layers",
]


ATTENTION = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


class Facts(NamedTuple):
    tied: bool  # a tensor under two names: functional_call's untying path is needed
    attends: bool  # some layer may run attention (see _batchable_kernels)


# Module structure changes (a parameter, buffer or submodule registered or assigned anywhere)
# bump this counter through torch's global registration hooks: what is derived from a module's
# structure is kept until it moves. Walking the module on every call cost a tenth of a small
# model's predict. Deleting an attribute fires no hook; it cannot add a tie or an attention
# layer, and check_matches, run on every call, refuses a posterior name that is gone.
GENERATION = [0]


FACTS: weakref.WeakKeyDictionary[nn.Module, tuple[int, Facts]] = weakref.WeakKeyDictionary()


SLOTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


MATCHES: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _structure_moved(*_: Any) -> None:
    GENERATION[0] += 1


for _register in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _register(_structure_moved)


def module_facts(module: nn.Module) -> Facts:
    """One walk over the layers (kept until the structure moves). Without ties,
    functional_call's untying walk (a tenth of a small MLP's forward) is skipped; with them, a
    draw for one name reaches the other, so tied weights stay tied. ``attends`` is False only
    for modules made of ``torch.nn``'s own layers, none of them attention: any class of the
    user's (or of a library's) may call ``scaled_dot_product_attention``."""
    compiling = torch.compiler.is_compiling()  # no cache there: see check_matches
    cached = None if compiling else FACTS.get(module)
    if cached is not None and cached[0] == GENERATION[0]:
        return cached[1]
    seen: set[int] = set()
    count = 0
    attends = False
    for layer in module_layers(module):  # _parameters and _buffers directly: no name building
        kind = type(layer)
        if not attends and (
            not kind.__module__.startswith("torch.nn.modules.") or issubclass(kind, ATTENTION)
        ):
            attends = True
        for table in (layer._parameters, layer._buffers):
            for tensor in table.values():
                if tensor is not None:
                    seen.add(id(tensor))
                    count += 1
    facts = Facts(len(seen) != count, attends)
    if not compiling:
        FACTS[module] = (GENERATION[0], facts)
    return facts


def module_layers(module: nn.Module) -> list[nn.Module]:
    """Every submodule once, the module first: ``modules()`` without its generators, kept
    until the structure moves (the submodules only: a value that held the module itself would
    keep its weak key alive)."""
    compiling = torch.compiler.is_compiling()  # no cache there: see check_matches
    cached = None if compiling else LAYERS.get(module)
    if cached is not None and cached[0] == GENERATION[0]:
        return [module, *cached[1]]
    found, stack, seen = [], [module], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(child for child in layer._modules.values() if child is not None)
    if not compiling:
        LAYERS[module] = (GENERATION[0], found[1:])
    return found
