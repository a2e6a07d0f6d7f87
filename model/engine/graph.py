"""The graph level of a v2 program: which layers compile together, and where values live.

A v2 artifact is a layer graph (:mod:`model.spec`). The compiler keeps the v1 engine's fusions
wherever a value flows through a *chain*: a run of layers in which each takes the previous one's
output and nothing else reads it. Inside a chain a binary layer's BatchNorm folds into the next
binarizer's thresholds, exactly as in a v1 model. Where a value has several readers (a residual
sum feeding both the next block's sign and its shortcut) or a layer merges several values
(``add``, ``concat``), the chain ends and the value stays real (float32) until each reader has
taken it. So a Bi-Real block compiles to: quantize the block input (a shift before the sign
folds into the per-channel cut) → binary conv → BatchNorm → add the shortcut (on the column
kernel the add joins the conv: :func:`model.engine.compiler.fuse_residual_adds`).

:func:`split_chains` finds the chains; :func:`wire` gives each operation its input and output
slots and the slots to release after it (a value is freed after its last reader, so a call
holds only the live values, as :mod:`model.engine.memory` assumes); :func:`run_wired` runs a
wired program with any backend's operation callback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from model.engine.ops import Op, Program, Wire
from model.spec import MODEL_INPUT, ModelSpec


@dataclass(frozen=True)
class Chain:
    """Layers (indices into ``spec.layers``, in order) that compile as one v1-style chain: the
    first reads ``sources`` (several for add/concat), each later one the previous one's output,
    which nothing else reads. Its output is named after its last layer."""

    layers: tuple[int, ...]
    sources: tuple[str, ...]


def split_chains(spec: ModelSpec) -> list[Chain]:
    """The chains of ``spec``'s graph, in an order that runs every value before its readers
    (by the position of each chain's last layer)."""
    sources = spec.layer_inputs()
    readers = Counter(name for names in sources for name in names)
    chains: list[list[int]] = []
    chain_sources: list[tuple[str, ...]] = []
    open_end: dict[str, int] = {}  # a chain's last layer, read by one layer only → the chain
    for i, (layer, names) in enumerate(zip(spec.layers, sources, strict=True)):
        single = len(names) == 1 and layer.arity == 1
        if single and names[0] in open_end and readers[names[0]] == 1:
            k = open_end.pop(names[0])
            chains[k].append(i)
        else:
            k = len(chains)
            chains.append([i])
            chain_sources.append(names)
        open_end[layer.name] = k
    found = [Chain(tuple(c), s) for c, s in zip(chains, chain_sources, strict=True)]
    return sorted(found, key=lambda chain: chain.layers[-1])


def wire(
    steps: Sequence[tuple[Op, tuple[str, ...], str]],
) -> tuple[tuple[Op, ...], tuple[Wire, ...]]:
    """Operations with named inputs and outputs (the model input is ``MODEL_INPUT``) → the
    operations and their :class:`Wire` s: integer slots, each released by its last reader. The
    last operation's output is the model's output and is never released."""
    slots: dict[str, int] = {MODEL_INPUT: 0}
    for _, _, output in steps:
        slots.setdefault(output, len(slots))
    last_reader: dict[str, int] = {}
    for at, (_, inputs, _) in enumerate(steps):
        for name in inputs:
            last_reader[name] = at
    wires = []
    for at, (_, inputs, output) in enumerate(steps):
        released = sorted({slots[name] for name in inputs if last_reader[name] == at})
        wires.append(Wire(tuple(slots[name] for name in inputs), slots[output], tuple(released)))
    return tuple(op for op, _, _ in steps), tuple(wires)


def run_wired(program: Program, x: Any, call: Callable[[Op, Any], Any]) -> Any:
    """Run a wired program on ``x``: ``call(op, value)`` computes one operation (``value`` is a
    tuple of the inputs for add and concat). Released slots are dropped as soon as their last
    reader has run."""
    assert program.wiring is not None, "run_wired runs programs compiled from a graph"
    slots: dict[int, Any] = {0: x}
    value = x
    for op, wiring in zip(program.ops, program.wiring, strict=True):
        inputs = tuple(slots[i] for i in wiring.inputs)
        value = call(op, inputs if len(inputs) > 1 else inputs[0])
        del inputs
        for i in wiring.release:
            del slots[i]
        slots[wiring.output] = value
    return value
