"""The depth pass: insert new blocks into block stacks, each computing the identity.

Maths (LEMON, "Depth"). A Pre-LN block ``x + F(x)`` is the identity when every residual
branch writes exactly 0. A new block is a copy of its (already widened) source whose
branch-ending layers (the last Linear of the MLP, the attention output projection) get
LEMON's *cancelling* weights ``W_c = R - (R E) P``: random ``R`` at the layer's init scale,
projected so that for the input expansion ``E`` of that layer ``W_c E = 0`` (the copies of
each duplicated input unit sum to zero), and bias 0. The branch's input in the grown model
is always ``E h``, so the branch writes ``W_c E h = 0`` exactly, yet every weight of the new
block gets a gradient. With no duplication (``E = I``) ``W_c = 0``. ``net2net`` uses 0.

Post-LN blocks ``norm(x + F(x))`` (LEMON's construction, exact up to the norms' eps): the
block before each new block gets an identity last norm (``gamma = 1, beta = 0``); the new
block takes that norm's ``gamma, beta`` on its own last norm, identity norms elsewhere on its
stream, and zero branches.

ResNet blocks ``relu(x + F(x))`` whose branch ends in a BatchNorm get that norm's
``gamma = beta = 0`` (LEMON's choice for residual CNNs); ``relu(x) = x`` because ``x`` is
the previous block's ReLU output. A branch with no weighted layer but a layer scale
(PoolFormer's ``gamma * (pool(x) - x)``) gets ``gamma = 0``.

Blocks are renumbered in execution order under the container's own naming, from its first
number (``blocks.0``, or ``s1.b1`` in timm's RegNet).

Blocks the analysis keeps (a downsampling block, a plain conv) are never copied; new blocks
follow the copyable ones.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from lemon_fx.analysis.stacks import Block, BlockStack
from lemon_fx.analysis.width import AxisUse
from lemon_fx.axes.expansion import LeafGrowth
from lemon_fx.recipe.recipe import Step, TensorRecipe
from lemon_fx.resolution.depth import StackGrowth
from lemon_fx.resolution.width import Resolution
from lemon_fx.tracing.graph_facts import module_stack, set_module_stack
from passes.result import PassResult

__all__ = ["NewBlock", "deepen"]


@dataclass
class NewBlock:
    stack: str
    position: int
    source: int
    name: str
    source_name: str  # the source block's name in the source model


@dataclass
class _Slot:
    """One position of the grown stack while it is being built."""

    source: int
    module: nn.Module
    nodes: list[torch.fx.Node] = field(default_factory=list)
    out: torch.fx.Node | None = None
    new: bool = False


def _fan_in_growth(res: Resolution, weight: str):
    """The expansion of a layer's input axis (the one its claim splits)."""
    analysis = res.analysis
    name = analysis.canonical(weight)
    dims = analysis.param_dims[name]
    for claim in analysis.claims.get(name, []):
        for axis, use in enumerate(claim.axes):
            if isinstance(use, AxisUse) and use.kind == "split":
                return axis, res.axis_growth(dims[axis], res.form(use.slot))
    return 1, LeafGrowth(analysis.dims.size(dims[1]), analysis.dims.size(dims[1]))


def _branch_end_step(res: Resolution, weight: str, grown: TensorRecipe, stream: str
                     ) -> Step:
    """A new block's branch-ending weight: ``W_c = R - (R E) P`` at the widened layer's
    init scale (noise stream ``stream``), or 0 for net2net."""
    if res.plan.method == "net2net":
        return Step("fill", value=0.0)
    axis, layout = _fan_in_growth(res, weight)
    shape = grown.shape
    fan_in = math.prod(shape) // shape[0] if axis == 1 else shape[axis]
    return Step("cancel", axis=axis, layout=layout, stream=stream, fan_in=fan_in)


def _under(name: str, path: str) -> bool:
    return name.startswith(path + ".")


def _grow_stack(gm: torch.fx.GraphModule, growth: StackGrowth, res: Resolution,
                made_of: dict[str, TensorRecipe], notes: list[str],
                moved: dict[str, torch.fx.Node]) -> list[NewBlock]:
    """Grow one stack. ``moved`` maps the name of a stack's old output to the node that
    replaced it for its readers (the last new block's output): a later stack reading it as
    its stream reads that node now, and its copies must map that node, not the old one."""
    stack: BlockStack = growth.stack
    by_name = {n.name: n for n in gm.graph.nodes}

    def local(node):  # the source graph's node -> the node that holds its value now
        return moved.get(node.name, by_name[node.name])

    blocks: list[Block] = stack.blocks
    originals = [gm.get_submodule(stack.child(i)) for i in range(stack.count)]
    block_nodes = [[local(n) for n in b.nodes] for b in blocks]
    slots: list[_Slot] = []
    seen: set[int] = set()
    current_in: dict[int, torch.fx.Node] = {}  # what each source block reads now
    # a kept first block that reads several inputs has no single stream in: it reads them
    prev_out = local(blocks[0].stream_in) if blocks[0].stream_in is not None else None
    last_node = block_nodes[0][0].prev
    graph = gm.graph
    for source in growth.order:
        block = blocks[source]
        if source not in seen:
            seen.add(source)
            nodes = block_nodes[source]
            old_in = local(block.stream_in) if block.stream_in is not None else None
            if old_in is not prev_out:
                members = set(nodes)
                old_in.replace_all_uses_with(
                    prev_out, delete_user_cb=lambda u, members=members: u in members)
            current_in[source] = prev_out
            slot = _Slot(source, originals[source], nodes, local(block.stream_out))
            last_node = nodes[-1]
        else:
            env = {current_in[source]: prev_out}
            copies = []
            cursor = last_node
            for node in block_nodes[source]:
                with graph.inserting_after(cursor):
                    new = graph.node_copy(node, lambda a, env=env: env.get(a, a))
                env[node] = new
                copies.append(new)
                cursor = new
            module = copy.deepcopy(originals[source])
            slot = _Slot(source, module, copies, env[local(block.stream_out)], new=True)
            last_node = cursor
        slots.append(slot)
        prev_out = slot.out
    final_out = local(blocks[-1].stream_out)
    if final_out is not prev_out:
        inside = {n for s in slots for n in s.nodes}
        final_out.replace_all_uses_with(prev_out, delete_user_cb=lambda u: u not in inside)
        moved[blocks[-1].stream_out.name] = prev_out

    _renumber_recipes(made_of, stack, slots, blocks)
    made = []
    for position, slot in enumerate(slots):
        if not slot.new:
            continue
        block = blocks[slot.source]
        name = stack.child(position)

        def here(source_name: str, name: str = name, block: Block = block) -> str:
            return name + source_name[len(block.path):]  # a source name in this new block

        for end in block.branch_ends:
            weight = made_of[here(end.weight)]
            if end.kind == "scale":  # a layer scale with no weighted layer behind it
                made_of[here(end.weight)] = weight.with_steps(Step("fill", value=0.0))
                continue
            if end.kind == "norm":  # LEMON for ResNets: the branch's last BN gets 0, 0
                made_of[here(end.weight)] = weight.with_steps(Step("fill", value=0.0))
                if end.bias:
                    made_of[here(end.bias)] = made_of[here(end.bias)].with_steps(
                        Step("fill", value=0.0))
                continue
            made_of[here(end.weight)] = weight.with_steps(
                _branch_end_step(res, end.weight, weight, f"{name}:{end.weight}"))
            if end.bias:
                made_of[here(end.bias)] = made_of[here(end.bias)].with_steps(
                    Step("fill", value=0.0))
        if stack.kind == "post_ln":
            _post_ln(made_of, stack, slots, position, blocks)
        made.append(NewBlock(stack.name, position, slot.source, name, block.path))
    if stack.kind == "post_ln" and made:
        notes.append(f"{stack.name}: Post-LN new blocks are exact only up to the norms' eps")
    _rename(gm, stack, slots, blocks)
    return made


def _renumber_recipes(made_of: dict[str, TensorRecipe], stack: BlockStack,
                      slots: list[_Slot], blocks: list[Block]) -> None:
    """Every tensor of the grown stack under its new block's name: position ``p`` holds
    what its source block's tensor is made of (a new block starts as a copy)."""
    paths = [b.path for b in blocks]  # not the container's other children (DLA's project)
    inside = {k: r for k, r in made_of.items() if any(_under(k, p) for p in paths)}
    for key in inside:
        del made_of[key]
    for position, slot in enumerate(slots):
        old, new = blocks[slot.source].path, stack.child(position)
        for key, recipe in inside.items():
            if _under(key, old):
                made_of[new + key[len(old):]] = recipe


def _post_ln(made_of: dict[str, TensorRecipe], stack: BlockStack, slots: list[_Slot],
             position: int, blocks: list[Block]) -> None:
    """Identity last norm on the block before; its gamma/beta move to the new block."""
    def names(at: int, params: tuple[str | None, str | None]) -> list[str | None]:
        path = blocks[slots[at].source].path
        return [None if p is None else stack.child(at) + p[len(path):] for p in params]

    def identity(key: str | None, value: float) -> None:
        if key is not None:
            made_of[key] = made_of[key].with_steps(Step("fill", value=value))

    before = blocks[slots[position - 1].source]
    last = names(position - 1, before.spine_norm_params[-1])
    moved = [None if key is None else made_of[key] for key in last]
    identity(last[0], 1.0)
    identity(last[1], 0.0)
    block = blocks[slots[position].source]
    norms = [names(position, params) for params in block.spine_norm_params]
    for gamma, beta in norms:
        identity(gamma, 1.0)
        identity(beta, 0.0)
    for key, recipe in zip(norms[-1], moved):
        if key is not None and recipe is not None:
            made_of[key] = recipe


def _rename(gm: torch.fx.GraphModule, stack: BlockStack, slots: list[_Slot],
             blocks: list[Block]) -> None:
    """Number blocks in execution order under the container's naming (from its first
    number, 0 or 1). The container keeps its class and any children that are not blocks,
    the blocks in place of the first one."""
    for position, slot in enumerate(slots):
        old, new = blocks[slot.source].path, stack.child(position)
        for node in slot.nodes:
            if node.op in ("call_module", "get_attr"):
                target = str(node.target)
                if target == old or target.startswith(old + "."):
                    node.target = new + target[len(old):]
            stack_meta = module_stack(node)
            if stack_meta:
                set_module_stack(node, type(stack_meta)(
                    (_renamed(k, old, new), (_renamed(p, old, new), c))
                    for k, (p, c) in stack_meta.items()))
    parent_name, _, attr = stack.name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    old_container = getattr(parent, attr)
    block_names = {b.path.rpartition(".")[2] for b in blocks}
    container = copy.copy(old_container)  # its class and attributes; children rebuilt
    container._modules = type(old_container._modules)()
    placed = False
    for child_name, child in old_container._modules.items():
        if child_name not in block_names:
            container._modules[child_name] = child
        elif not placed:
            placed = True
            for position, slot in enumerate(slots):
                container._modules[stack.child(position).rpartition(".")[2]] = slot.module
    setattr(parent, attr, container)


def _renamed(path: str, old: str, new: str) -> str:
    if path == old or path.startswith(old + "."):
        return new + path[len(old):]
    return path


def deepen(gm: torch.fx.GraphModule, growths: list[StackGrowth], res: Resolution,
           made_of: dict[str, TensorRecipe]) -> tuple[PassResult, list[NewBlock], list[str]]:
    """Grow every stack of ``growths`` in ``gm`` (a private, already widened copy).

    ``made_of`` maps each tensor name of ``gm`` to its recipe; it is updated to the grown
    names (blocks renumbered, new blocks' copies, their cancelling branch ends and, for
    Post-LN stacks, identity norms). No tensor value is read or written here."""
    made: list[NewBlock] = []
    notes: list[str] = []
    moved: dict[str, torch.fx.Node] = {}
    for growth in growths:
        made += _grow_stack(gm, growth, res, made_of, notes, moved)
    gm.graph.lint()
    gm.recompile()
    rewrites = [f"new block {b.name} from {b.source_name}" for b in made]
    return PassResult(gm, bool(made), rewrites), made, notes
