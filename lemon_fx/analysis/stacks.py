"""Block stacks: numbered children of a container that run one after another on one stream.

A stack is a family of submodules ``<container>.<prefix><N>`` (``blocks.3``,
``model.layers.3``, ``encoder.layers.encoder_layer_3``) of one class, found from the module
paths the tracer recorded (``nn_module_stack``). For each block the graph gives:

- its nodes, its *stream input* (the previous block's output) and its *stream output*;
- its *spine*: from the output back to the input through residual adds and norms. Every
  add on the spine has a *branch* (the other operand); the spine's norms are the Post-LN
  norms;
- each branch's *end*: the last layer with weights before the branch joins the stream
  (through dropout, layer scale, reshapes). Depth growth sets those layers to write zero.

A ResNet block ends in ``relu(x + F(x))``: with ``F = 0`` that is ``relu(x) = x`` because
``x``, the previous block's output, is itself a ReLU's output. So a ReLU may close the
spine when every copied block ends in one.

Blocks that cannot compute the identity are *kept* (they stay where they are, never
copied), and the stack grows by copying the others: a block that changes the stream's
shape (a stage's downsampling first block, MobileNetV2's strided blocks in the middle of
``features``), and one whose spine is not a residual add (no zero branch makes it ``x``:
a plain conv block, a final 1x1 conv). Keeping a block is always exact; only new blocks
must be identities. A stack whose every block is kept cannot grow (``nothing_to_copy``).
A block that is not a link of one chain (several outputs used outside it, or not reading
the previous block's output) stops the whole stack: there is no stream to insert into.

Children may be numbered from 0 or from 1 (timm's RegNet: ``s1.b1``, ``s1.b2``; a family
numbered from 1 is a stack only if it can grow, since ``ls1``, ``ls2`` are parts of one
block) and be of
different classes (torchvision's ``features``: a stem conv, inverted residuals, a last
conv), but not single layers with rules of their own (a ``Sequential`` MLP is not a stack).

Kinds: ``pre_ln`` (norms only inside branches: ``x + F(norm(x))``), ``post_ln`` (the block
ends in a norm on the stream: ``norm(x + F(x))``), ``residual`` (residual adds, no norms),
``plain`` (no residual add: a new block cannot be the identity, so no depth growth).

A residual add ``torch.add(x, F, alpha=a)`` computes ``x + a F``: zero stays zero, so it is
a residual add. ``torch.add(F, x, alpha=a)`` computes ``F + a x``: a zero branch leaves
``a x``, not ``x``, so such a block is refused (its stream is scaled).

Which node is a residual add, a norm on the stream, a branch's end, or one the walks pass
through is each node's rule's answer (``Rule.residual_operands``, ``stream_norm_params``,
``branch_end``, ``passes_value``/``passes_zero``, ``idempotent``), from the registry
``find_stacks`` is given: this module keeps no list of ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule
from lemon_fx.tracing.graph_facts import has_tensor_fact, module_stack, tensor_shape

__all__ = ["Block", "BlockStack", "BranchEnd", "find_stacks"]


@dataclass
class Block:
    """One block of a stack, as the graph shows it.

    Fields:

    - ``index``: its number in the stack (``N`` of ``blocks.N``).
    - ``path``: its qualified module name (``"blocks.3"``).
    - ``nodes``: the graph nodes traced inside it, in graph order.
    - ``stream_in``: the node it reads the stream from (the previous block's output).
    - ``stream_out``: its one output used outside it (the stream it hands on).
    - ``branch_ends``: one ``BranchEnd`` per residual branch (several when a branch is
      itself a sum): the layers a new block sets to write zero.
    - ``spine_norms``: the feature norms on the stream (Post-LN), from input to output.
    - ``spine_norm_params``: for each of ``spine_norms``, the qualified names
      ``(gamma, beta)`` of its affine parameters (None for one it lacks), as its rule's
      ``stream_norm_params`` gave them.
    - ``spine_relu``: whether the block's output is an idempotent op (a ReLU) applied to
      the stream.
    - ``changes_shape``: whether it reads a stream of another shape than it writes (a
      stage's downsampling block: kept, never copied).
    - ``problem``: why it cannot be copied as an identity block, or None.
    - ``kept``: whether, with that problem, the block still is a link of the stack's
      chain (one stream in, one out), so that it stays in place while others are copied;
      False with a problem means the stack cannot grow at all.
    - ``problem_node``: the node the problem is at (None when it is the block as a whole).
    - ``fix``: how to fix the problem.
    """

    index: int
    path: str
    nodes: list[torch.fx.Node] = field(repr=False)
    stream_in: torch.fx.Node = field(repr=False)
    stream_out: torch.fx.Node = field(repr=False)
    branch_ends: list[BranchEnd] = field(default_factory=list, repr=False)
    spine_norms: list[torch.fx.Node] = field(default_factory=list, repr=False)
    spine_norm_params: list[tuple[str | None, str | None]] = field(default_factory=list,
                                                                   repr=False)
    spine_relu: bool = False
    changes_shape: bool = False
    problem: str | None = None
    kept: bool = False
    # the node the problem is at (None when it is the block as a whole) and how to fix it
    problem_node: torch.fx.Node | None = field(default=None, repr=False)
    fix: str | None = field(default=None, repr=False)


@dataclass
class BlockStack:
    """A family of numbered blocks ``<name>.<child_prefix><N>`` run one after another on
    one stream: what depth growth may add blocks to.

    Fields (the first three are the public summary ``inspect`` shows and compares):

    - ``name``: the container's qualified name (``"blocks"``, ``"model.layers"``): the
      key of ``Plan(depth={...})``.
    - ``count``: how many blocks it has.
    - ``kind``: ``"pre_ln"`` (``x + F(norm(x))``), ``"post_ln"`` (``norm(x + F(x))``),
      ``"residual"`` (residual adds, no feature norms), ``"plain"`` (no residual add: no
      depth growth) or ``"mixed"`` (blocks of different kinds: no depth growth).
    - ``blocks``: the ``Block`` analysis of each block, in order.
    - ``child_prefix``: what comes between the container's name and a block's number
      (``"encoder_layer_"`` in torchvision's ViT, ``""`` usually).
    - ``problem``: why the stack cannot grow in depth, or None.
    - ``problem_node``: the node the problem is at (None when it is the stack as a whole).
    - ``fix``: how to fix the problem.
    - ``copyable``: the indices of the blocks a new block may copy (kept blocks may not).
    - ``first_index``: the number of its first child (0, or 1 for ``s1.b1``).
    - ``nothing_to_copy``: its only problem is that every block is kept (each changes the
      stream's shape or has no residual add): a bare depth leaves it as it is.
    - ``period``: the smallest ``p`` such that the copyable blocks' graphs repeat every
      ``p`` blocks (Swin alternates plain and shifted windows: 2); 1 when all are alike.
      The class builds such blocks by position (``shift = 0 if i % 2 == 0``), so depth
      growth copies whole periods to keep every block at a position of its kind.
    """

    name: str
    count: int
    kind: str
    blocks: list[Block] = field(default_factory=list, repr=False, compare=False)
    child_prefix: str = field(default="", repr=False, compare=False)
    problem: str | None = field(default=None, repr=False, compare=False)
    # the node the problem is at (None when it is the stack as a whole), and the fix
    problem_node: torch.fx.Node | None = field(default=None, repr=False, compare=False)
    fix: str | None = field(default=None, repr=False, compare=False)
    # blocks that may be copied (a downsampling first block may not)
    copyable: list[int] = field(default_factory=list, repr=False, compare=False)
    first_index: int = field(default=0, repr=False, compare=False)
    nothing_to_copy: bool = field(default=False, repr=False, compare=False)
    # the smallest p such that the copyable blocks repeat their graph every p blocks (2 for
    # Swin, whose odd blocks shift their windows): a class places such blocks by position
    period: int = field(default=1, repr=False, compare=False)

    def child(self, index: int) -> str:
        """The qualified module name of the block at position ``index`` (from 0)."""
        return f"{self.name}.{self.child_prefix}{self.first_index + index}"

    @property
    def kept(self) -> list[int]:
        """The positions of the blocks that stay as they are, never copied."""
        return [b.index for b in self.blocks if b.kept]


# ``blocks.3``, ``encoder_layer_3``, torchvision RegNet's ``block1-3`` (its prefix holds
# the stage's number)
_CHILD = re.compile(r"^(?P<container>.+)\.(?P<prefix>(?:[A-Za-z_][\w-]*?)?)(?P<index>\d+)$")


def _module_paths(gm: torch.fx.GraphModule) -> dict[str, type]:
    paths: dict[str, type] = {}
    for node in gm.graph.nodes:
        for path, cls in module_stack(node).values():
            paths[path] = cls
        if node.op == "call_module":
            paths.setdefault(str(node.target), type(gm.get_submodule(node.target)))
    return paths


def _families(gm: torch.fx.GraphModule) -> dict[tuple[str, str], dict[int, type]]:
    found: dict[tuple[str, str], dict[int, type]] = {}
    for path, cls in _module_paths(gm).items():
        match = _CHILD.match(path)
        if match:
            key = (match["container"], match["prefix"])
            found.setdefault(key, {})[int(match["index"])] = cls
    return found


def find_stacks(gm: torch.fx.GraphModule, registry: Registry) -> list[BlockStack]:
    """Every block stack of ``gm``, analyzed; ``registry``'s rules answer which node ends
    a residual branch, which is a norm on the stream, and which the walks pass through."""
    rules = _Rules(gm, registry)
    stacks = []
    for (container, prefix), children in _families(gm).items():
        first = min(children)
        if first not in (0, 1) or sorted(children) != list(range(first,
                                                                first + len(children))):
            continue
        if any(registry.has_module_rule(cls) for cls in set(children.values())):
            continue  # a Sequential of single layers (each one op) is an MLP, not blocks
        stack = BlockStack(container, len(children), "plain", child_prefix=prefix,
                           first_index=first)
        _analyze_stack(rules, stack)
        if first == 1 and stack.problem:
            continue  # numbered parts of a block (``ls1``, ``norm1``), not blocks to copy
        stacks.append(stack)
    return stacks


@dataclass
class _Rules:
    """Depth's questions about the nodes of one graph, answered by their rules (a node
    without a rule answers "no" to every one)."""

    gm: torch.fx.GraphModule
    registry: Registry

    def _rule(self, node) -> Rule | None:
        if not isinstance(node, torch.fx.Node):
            return None
        return self.registry.lookup(node, self.gm)

    def branch_end(self, node) -> BranchEnd | None:
        rule = self._rule(node)
        return rule.branch_end(node, self.gm) if rule else None

    def stream_norm_params(self, node) -> tuple[str | None, str | None] | None:
        rule = self._rule(node)
        return rule.stream_norm_params(node, self.gm) if rule else None

    def passes_value(self, node) -> torch.fx.Node | None:
        rule = self._rule(node)
        return rule.passes_value(node, self.gm) if rule else None

    def passes_zero(self, node) -> torch.fx.Node | None:
        rule = self._rule(node)
        return rule.passes_zero(node, self.gm) if rule else None

    def zero_factors(self, node) -> tuple[torch.fx.Node, ...]:
        rule = self._rule(node)
        return rule.zero_factors(node, self.gm) if rule else ()

    def residual_operands(self, node) -> tuple | None:
        rule = self._rule(node)
        return rule.residual_operands(node, self.gm) if rule else None

    def idempotent(self, node) -> torch.fx.Node | None:
        rule = self._rule(node)
        return rule.idempotent(node, self.gm) if rule else None


def _in_block(node: torch.fx.Node, path: str) -> bool:
    if node.op in ("call_module", "get_attr") and (
            str(node.target) == path or str(node.target).startswith(path + ".")):
        return True
    stack = module_stack(node)
    return any(p == path for p, _ in stack.values())


def _analyze_stack(rules: _Rules, stack: BlockStack) -> None:
    previous_out = None
    kinds = set()
    for i in range(stack.count):
        path = stack.child(i)
        nodes = [n for n in rules.gm.graph.nodes if _in_block(n, path)]
        block = _analyze_block(rules, i, path, nodes, previous_out)
        stack.blocks.append(block)
        if block.problem and not block.kept:  # not a link of one chain: no stream
            stack.problem = f"block {path}: {block.problem}"
            stack.problem_node, stack.fix = block.problem_node, block.fix
            stack.copyable = []
            return
        previous_out = block.stream_out
        if block.kept:
            continue
        stack.copyable.append(i)
        kinds.add(_kind(rules, block))
    copied = [stack.blocks[i] for i in stack.copyable]
    if not copied:
        # the most telling block: one that keeps the shape yet is no residual block
        first = next((b for b in stack.blocks if not b.changes_shape), stack.blocks[0])
        stack.nothing_to_copy = True
        stack.problem = (f"no block can be copied as an identity: every block changes the "
                         f"stream's shape or is no residual block (block {first.path}: "
                         f"{first.problem})")
        stack.problem_node, stack.fix = first.problem_node, first.fix
        stack.kind = "plain"
        return
    if any(b.spine_relu for b in copied) and not all(b.spine_relu for b in copied):
        stack.problem = "some blocks end in a ReLU and some do not"
    stack.period = _period(stack)
    stack.kind = kinds.pop() if len(kinds) == 1 else "mixed"
    if stack.kind == "mixed":
        stack.problem = "its blocks are of different kinds"


def _signature(block: Block) -> tuple:
    """What a block computes, without its names: each node's op and target (a module by
    its class, a parameter by its path inside the block)."""
    def target(node):
        if node.op == "call_module":
            return type(node.graph.owning_module.get_submodule(node.target)).__name__
        if node.op == "get_attr":
            return str(node.target)[len(block.path):]
        return str(node.target)
    return tuple((n.op, target(n)) for n in block.nodes)


def _period(stack: BlockStack) -> int:
    """The smallest ``p`` dividing the stack's copyable run such that block ``i``'s graph
    is block ``i + p``'s; 1 when the blocks are alike or follow no period."""
    run = stack.copyable
    if len(run) < 2 or run != list(range(run[0], run[0] + len(run))):
        return 1
    signatures = [_signature(stack.blocks[i]) for i in run]
    if len(set(signatures)) == 1:
        return 1
    for p in range(2, len(run) + 1):
        if len(run) % p == 0 and all(signatures[i] == signatures[i % p]
                                     for i in range(len(run))):
            return p
    return 1


def _is_size(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes a number from sizes (torch.export shares ``B * T`` between
    blocks), not a tensor: another block may read it, since a copied block makes its own."""
    return isinstance(node.meta.get("val"), (int, torch.SymInt, torch.SymFloat, torch.SymBool))


def _analyze_block(rules: _Rules, index, path, nodes, previous_out) -> Block:
    members = set(nodes)
    outside_users = [n for n in nodes if any(u not in members for u in n.users)]
    tensor_outs = [n for n in outside_users if has_tensor_fact(n) and not _is_size(n)]
    block = Block(index, path, nodes, stream_in=None, stream_out=None)
    if len(tensor_outs) != 1:
        block.problem = f"it has {len(tensor_outs)} outputs used outside it, not one stream"
        return block
    block.stream_out = tensor_outs[0]
    external = []
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg not in members and arg not in external:
                external.append(arg)
    shape = _shape(block.stream_out)
    if previous_out is not None:
        if previous_out not in external:
            block.problem = "it does not read the previous block's output"
            return block
        block.stream_in = previous_out
    else:
        candidates = [a for a in external if _shape(a) == shape and _shape(a) is not None]
        tensors = [a for a in external if _shape(a) is not None]
        if candidates:
            block.stream_in = candidates[0]
        elif len(tensors) == 1:  # a downsampling block: it starts the stack
            block.stream_in = tensors[0]
        else:  # several inputs of other shapes: it starts the stack, which reads it whole
            block.changes_shape = block.kept = True
            block.problem = "it changes the shape of the stream"
            return block
    if _shape(block.stream_in) != shape or shape is None:
        block.changes_shape = block.kept = True
        block.problem = "it changes the shape of the stream"
        return block
    _walk_spine(rules, block)
    return block


def _shape(node: torch.fx.Node):
    return tensor_shape(node)


def _is_one(value) -> bool:
    return isinstance(value, (int, float)) and value == 1


def _walk_spine(rules: _Rules, block: Block) -> None:
    members = set(block.nodes)

    def on_spine(v) -> bool:
        if v is block.stream_in:
            return True
        if not isinstance(v, torch.fx.Node) or v not in members:
            return False
        operands = rules.residual_operands(v)
        if operands is not None:
            return any(on_spine(a) for a in operands[:2])
        if rules.stream_norm_params(v) is not None:
            return on_spine(v.args[0])
        passed = rules.passes_value(v)
        return passed is not None and on_spine(passed)

    node = block.stream_out
    seen_add = False
    while node is not block.stream_in:
        operands = rules.residual_operands(node)
        norm_params = rules.stream_norm_params(node) if operands is None else None
        if operands is not None:
            a, b, alpha = operands
            spine = [x for x in (a, b) if on_spine(x)]
            if len(spine) != 1:  # a projection shortcut, proj(x) + F(x): not an identity
                _refuse(block, node, f"'{node.name}' is not a residual add of the stream and "
                        "a branch", keep=True)
                return
            if spine[0] is not a and not _is_one(alpha):
                _refuse(block, node, f"'{node.name}' adds the stream as its second operand "
                        f"with alpha={alpha!r}, so the residual stream is scaled by alpha: "
                        f"a new block whose branch writes zero would compute {alpha!r} * x, "
                        "not x",
                        fix="write the add with the stream first, torch.add(x, f(x), "
                        "alpha=...) (alpha then scales only the branch), or as x + f(x)")
                return
            branch = b if spine[0] is a else a
            if not _branch_ends(rules, block, branch):
                return
            seen_add = True
            node = spine[0]
        elif norm_params is not None:
            block.spine_norms.insert(0, node)
            block.spine_norm_params.insert(0, norm_params)
            node = node.args[0]
        elif node is block.stream_out and (closed := rules.idempotent(node)) is not None:
            block.spine_relu = True
            node = closed
        elif (passed := rules.passes_value(node)) is not None:
            node = passed
        else:
            # before any residual add: a plain block (conv, bn, act), kept as it is
            _refuse(block, node, f"'{node.name}' on the path from the block's output to its "
                    "input is neither a residual add nor a norm", keep=not seen_add)
            return
    if not seen_add:
        _refuse(block, None, "it has no residual add", keep=True)


# the block computes something other than stream + branches: no zero branch makes it x
_COMBINATION_FIX = ("write the block as x + f(x) (a plain residual add of the stream and a "
                    "branch ending in a Linear/Conv layer; norms may wrap it: norm(x + f(x)))")


def _refuse(block: Block, node: torch.fx.Node | None, reason: str,
            fix: str = _COMBINATION_FIX, keep: bool = False) -> None:
    """``block`` cannot be copied because of ``reason``; ``keep``: it is no residual block
    at all (plain, or a projection shortcut), so it stays in place while the stack's
    residual blocks are copied; otherwise a residual block failed and the stack stops."""
    block.problem, block.problem_node, block.fix, block.kept = reason, node, fix, keep


def _branch_ends(rules: _Rules, block: Block, value) -> bool:
    """Find the weighted layers that end a branch; False (with a problem) if there are none.

    From the residual add back through the nodes whose rules pass zero (dropout, layer
    scale, reshapes) to the nodes whose rules end a branch; a sum inside the branch needs
    an end on each operand (alpha scales the second: zero stays zero), a product of two
    activations an end on one factor (a mixture of experts' routing weights times the
    experts' outputs). A layer scale ends
    a branch only where no layer with weights does deeper in."""
    ends = _ends_of(rules, value)
    if ends is not None:
        block.branch_ends += ends
        return True
    name = value.name if isinstance(value, torch.fx.Node) else repr(value)
    _refuse(block, value if isinstance(value, torch.fx.Node) else None,
            f"the residual branch ending at '{name}' does not end in a layer with weights "
            "(Linear, Conv, MultiheadAttention) that can write zero",
            fix=_BRANCH_END_FIX)
    return False


def _ends_of(rules: _Rules, value) -> list[BranchEnd] | None:
    node = value
    while isinstance(node, torch.fx.Node):
        end = rules.branch_end(node)
        if end is not None and end.kind != "scale":
            return [end]
        operands = rules.residual_operands(node)
        if operands is not None:
            parts = [_ends_of(rules, a) for a in operands[:2]]
            return None if any(p is None for p in parts) else [e for p in parts for e in p]
        passed = rules.passes_zero(node)
        if end is not None:  # a scale: a layer deeper in keeps every new weight learning
            deeper = _ends_of(rules, passed) if passed is not None else None
            return deeper if deeper is not None else [end]
        if passed is None:  # a product of two activations: either factor's zero will do
            for factor in rules.zero_factors(node):
                ends = _ends_of(rules, factor)
                if ends is not None:
                    return ends
            break
        node = passed
    return None


_BRANCH_END_FIX = "restructure the block so every residual branch ends in a Linear/Conv layer"


def _kind(rules: _Rules, block: Block) -> str:
    if block.spine_norms and block.spine_norms[-1] is block.stream_out:
        return "post_ln"
    if any(rules.stream_norm_params(n) is not None for n in block.nodes) and not any(
            e.kind == "norm" for e in block.branch_ends):
        return "pre_ln"
    return "residual"
