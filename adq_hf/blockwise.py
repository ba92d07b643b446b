"""A model as a chain of repeated blocks, run one block at a time on cached inputs (block-by-block PTQ).

GPTQ-style: the model runs once per calibration batch up to its first block, and those inputs
(hidden states plus whatever else the block is called with: attention masks, position embeddings,
rotary tables) are cached; each block is then processed from its cached inputs and run once on
them to give the next block's inputs. One pass through the model in total, instead of one per
layer.

Blocks (``find_blocks``): the children of the outermost ``nn.ModuleList``/``nn.Sequential``
containers whose children (two or more) are all of one class and hold quantized layers (blocks left
in float are run, not quantized):
transformers' decoder/encoder layers (``model.layers``, ``encoder.layer``, ``transformer.h``), timm
ViT ``blocks``, ResNet residual blocks (``layer1.0`` ...), EfficientNet stages. ``plan_blocks``
checks them on one real batch: each block is called exactly once, block ``i + 1`` gets block
``i``'s output as its hidden state, and records whether the other arguments are the same objects
for every block (then only the first block's call is captured per batch; otherwise every block's).
When a check fails the caller falls back to layer-at-a-time PTQ; the reason is in the plan.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .surgery import model_inputs


class Captured(Exception):
    """Raised by a capture hook to end a forward pass once what it needs has been seen."""


def run_model(model: nn.Module, batch, device=None) -> Any:
    """``model(batch)`` with the batch moved to ``device`` (default: the model's), without a KV cache
    (``use_cache=False`` where the forward takes it: cache objects would grow with every block run)."""
    device = device if device is not None else next(model.parameters()).device
    args, kwargs = model_inputs(batch)
    args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    if isinstance(batch, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    try:
        return model(*args, **kwargs)
    except RuntimeError as err:  # shape/dtype errors from the model itself
        raise ValueError(f"a calibration batch does not fit the model ({err}); pass batches of this "
                         "model's inputs.") from None


def find_blocks(model: nn.Module, layers) -> List[Tuple[str, nn.Module]]:
    """``(name, block)`` in module order (see the module docstring); ``layers``: the quantized layers."""
    layers = set(layers)

    def holds(module):
        return any(m in layers for m in module.modules())

    containers = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) >= 2 and len({type(c) for _, c in children}) == 1 and any(holds(c) for _, c in children):
            containers.append((name, module))
    names = [n for n, _ in containers]
    outermost = [(n, m) for n, m in containers if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names)]
    return [(f"{n}.{c}" if n else c, child) for n, m in outermost for c, child in m.named_children()]


def _hidden_of(output):
    """The hidden state a block returns: the tensor itself, or the first element of a tuple."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def _same(a, b) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality
        return False


@dataclass
class BlockPlan:
    """Blocks in call order, where their hidden state goes, and whether all share their other arguments."""

    blocks: List[Tuple[str, nn.Module]] = field(default_factory=list)
    slot: Tuple[str, Any] = ("arg", 0)  # ("arg", 0) or ("kwarg", name)
    shared_arguments: bool = True
    reason: str = ""  # why there is no plan (blocks is empty then)


def _split(slot, args, kwargs):
    """``(hidden, args, kwargs)`` with the hidden state's place set to ``None``."""
    if slot[0] == "arg":
        return args[0], (None,) + tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop(slot[1]), tuple(args), {**rest, slot[1]: None}


def _slot(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return ("arg", 0)
    if torch.is_tensor(kwargs.get("hidden_states")):
        return ("kwarg", "hidden_states")
    return None


@torch.no_grad()
def plan_blocks(model: nn.Module, layers, batch) -> BlockPlan:
    """Find the blocks and check them on ``batch`` (module docstring); an empty plan says why not."""
    blocks = find_blocks(model, layers)
    if len(blocks) < 2:
        return BlockPlan(reason="no repeated blocks holding the quantized layers were found")
    calls: Dict[int, list] = {i: [] for i in range(len(blocks))}
    order: List[int] = []
    handles = []
    for i, (_, block) in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            calls[i].append([args, kwargs, None])
            order.append(i)

        def post(module, args, kwargs, output, i=i):
            calls[i][-1][2] = output

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != 1 for c in calls.values()):
        return BlockPlan(reason="a block is not called exactly once per forward (shared or skipped blocks)")
    blocks = [blocks[i] for i in order]
    records = [calls[i][0] for i in order]
    slot = _slot(records[0][0], records[0][1])
    if slot is None or any(_slot(a, k) != slot for a, k, _ in records):
        return BlockPlan(reason="the blocks' hidden state is neither their first argument nor `hidden_states=`")
    shared = True
    _, first_args, first_kwargs = _split(slot, *records[0][:2])
    for (args, kwargs, _), (_, _, previous_output) in zip(records[1:], records[:-1]):
        hidden, rest_args, rest_kwargs = _split(slot, args, kwargs)
        previous = _hidden_of(previous_output)
        if previous is None or not _same(hidden, previous):
            return BlockPlan(reason="a block's input is not the previous block's output")
        shared = shared and _same(rest_args, first_args) and _same(rest_kwargs, first_kwargs)
    if _hidden_of(records[-1][2]) is None:
        return BlockPlan(reason="the last block returns no tensor")
    return BlockPlan(blocks=blocks, slot=slot, shared_arguments=shared)


@dataclass
class BlockInput:
    """One calibration batch at the current block: its hidden state, how each block is called
    (one shared call, or one per block; the hidden state's place holds ``None``) and its token mask."""

    hidden: torch.Tensor
    calls: List[Tuple[tuple, dict]]
    mask: Optional[torch.Tensor] = None

    def run(self, plan: BlockPlan, index: int):
        args, kwargs = self.calls[0 if len(self.calls) == 1 else index]
        if plan.slot[0] == "arg":
            args = (self.hidden,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, plan.slot[1]: self.hidden}
        return plan.blocks[index][1](*args, **kwargs)

    def advance(self, plan: BlockPlan, index: int) -> None:
        """Run block ``index`` and keep its output as the hidden state for the next one."""
        self.hidden = _hidden_of(self.run(plan, index))


@torch.no_grad()
def capture_inputs(model: nn.Module, plan: BlockPlan, batches: List, start: int = 0, masks=None) -> List[BlockInput]:
    """The inputs of block ``start`` for every batch: the model runs up to that block (shared
    arguments), or through every block recording each one's call (per-block arguments)."""
    target = plan.blocks[start][1]
    inputs = []
    for b, batch in enumerate(batches):
        seen: Dict[int, tuple] = {}
        handles = []
        for i, (_, block) in enumerate(plan.blocks):
            if plan.shared_arguments and block is not target:
                continue

            def pre(module, args, kwargs, i=i):
                # later blocks' hidden states come from the chain: keep only how they are called
                seen[i] = _split(plan.slot, args, kwargs) if i == start else (None,) + _split(plan.slot, args, kwargs)[1:]
                if plan.shared_arguments:
                    raise Captured

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            run_model(model, batch)
        except Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        hidden = seen[start][0]
        calls = [seen[i][1:] for i in sorted(seen)]
        inputs.append(BlockInput(hidden, calls, None if masks is None else masks[b]))
    return inputs
