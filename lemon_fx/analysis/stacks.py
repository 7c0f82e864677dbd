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
spine when every block ends in one. A first block that changes the shape (a stage's
downsampling block) is kept but never copied.

Kinds: ``pre_ln`` (norms only inside branches: ``x + F(norm(x))``), ``post_ln`` (the block
ends in a norm on the stream: ``norm(x + F(x))``), ``residual`` (residual adds, no norms),
``plain`` (no residual add: a new block cannot be the identity, so no depth growth).

A residual add ``torch.add(x, F, alpha=a)`` computes ``x + a F``: zero stays zero, so it is
a residual add. ``torch.add(F, x, alpha=a)`` computes ``F + a x``: a zero branch leaves
``a x``, not ``x``, so such a block is refused (its stream is scaled).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.tracing.graph_facts import has_tensor_fact, module_stack, tensor_shape

__all__ = ["Block", "BlockStack", "BranchEnd", "find_stacks"]

aten = torch.ops.aten
_NORM_MODULES: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                     else ())
_NORM_FUNCTIONS = {F.layer_norm, aten.layer_norm.default} | (
    {F.rms_norm, aten.rms_norm.default} if hasattr(F, "rms_norm") else set())
# torch.export keeps ``x += residual`` as aten.add_: a residual add all the same.
_ADDS = {operator.add, torch.add, operator.iadd, "add", aten.add.Tensor, aten.add_.Tensor}
_PASS_THROUGH_MODULES = (nn.Dropout, nn.Identity)
_PASS_THROUGH_METHODS = {"contiguous", "view", "reshape", "transpose", "permute", "flatten"}
_PASS_THROUGH_FUNCTIONS = {F.dropout, torch.reshape, torch.transpose, torch.flatten,
                           aten.dropout.default, aten.clone.default, aten.view.default,
                           aten.reshape.default, aten._unsafe_view.default,
                           aten.transpose.int, aten.permute.default}
_DIVS = {operator.truediv, torch.div, "div", aten.div.Tensor}
_MULS = {operator.mul, torch.mul, "mul", aten.mul.Tensor} | _DIVS
_NOT_BLOCKS = (nn.Linear, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Dropout, nn.LayerNorm,
               nn.Identity, nn.Embedding, nn.Conv1d, nn.Conv2d)


@dataclass
class BranchEnd:
    """The last weighted layer of a residual branch: set to write exactly zero.

    ``kind`` is "linear" (a Linear/Conv/attention output: LEMON's cancelling weights) or
    "norm" (a BatchNorm ending a ResNet branch: ``gamma = beta = 0``).
    """

    node: torch.fx.Node
    weight: str
    bias: str | None
    kind: str = "linear"


@dataclass
class Block:
    index: int
    path: str
    nodes: list[torch.fx.Node] = field(repr=False)
    stream_in: torch.fx.Node = field(repr=False)
    stream_out: torch.fx.Node = field(repr=False)
    branch_ends: list[BranchEnd] = field(default_factory=list, repr=False)
    spine_norms: list[torch.fx.Node] = field(default_factory=list, repr=False)
    spine_relu: bool = False
    changes_shape: bool = False
    problem: str | None = None
    # the node the problem is at (None when it is the block as a whole) and how to fix it
    problem_node: torch.fx.Node | None = field(default=None, repr=False)
    fix: str | None = field(default=None, repr=False)


@dataclass
class BlockStack:
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

    def child(self, index: int) -> str:
        """The qualified module name of block ``index``."""
        return f"{self.name}.{self.child_prefix}{index}"


_CHILD = re.compile(r"^(?P<container>.+)\.(?P<prefix>[A-Za-z_]*?)(?P<index>\d+)$")


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
    stacks = []
    for (container, prefix), children in _families(gm).items():
        classes = set(children.values())
        if sorted(children) != list(range(len(children))) or len(classes) != 1:
            continue
        if issubclass(next(iter(classes)), _NOT_BLOCKS):
            continue  # a Sequential of single layers is an MLP, not a block stack
        stack = BlockStack(container, len(children), "plain", child_prefix=prefix)
        _analyze_stack(gm, stack)
        stacks.append(stack)
    return stacks


def _in_block(node: torch.fx.Node, path: str) -> bool:
    if node.op in ("call_module", "get_attr") and (
            str(node.target) == path or str(node.target).startswith(path + ".")):
        return True
    stack = module_stack(node)
    return any(p == path for p, _ in stack.values())


def _analyze_stack(gm: torch.fx.GraphModule, stack: BlockStack) -> None:
    previous_out = None
    kinds = set()
    for i in range(stack.count):
        path = stack.child(i)
        nodes = [n for n in gm.graph.nodes if _in_block(n, path)]
        block = _analyze_block(gm, i, path, nodes, previous_out)
        stack.blocks.append(block)
        if i == 0 and block.changes_shape and stack.count > 1:
            previous_out = block.stream_out  # a downsampling first block: kept, not copied
            continue
        if block.problem:
            stack.problem = stack.problem or f"block {path}: {block.problem}"
            stack.problem_node, stack.fix = block.problem_node, block.fix
            stack.kind = "plain" if "residual add" in block.problem else stack.kind
            return
        previous_out = block.stream_out
        stack.copyable.append(i)
        kinds.add(_kind(gm, block))
    if any(b.spine_relu for b in stack.blocks) and not all(
            b.spine_relu for b in stack.blocks[1:]):
        stack.problem = "some blocks end in a ReLU and some do not"
    stack.kind = kinds.pop() if len(kinds) == 1 else "mixed"
    if stack.kind == "plain":
        stack.problem = ("its blocks have no residual add, so a new block cannot compute "
                         "the identity")
    elif stack.kind == "mixed":
        stack.problem = "its blocks are of different kinds"


def _analyze_block(gm, index, path, nodes, previous_out) -> Block:
    members = set(nodes)
    outside_users = [n for n in nodes if any(u not in members for u in n.users)]
    tensor_outs = [n for n in outside_users if has_tensor_fact(n)]
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
    if previous_out is not None:
        if previous_out not in external:
            block.problem = "it does not read the previous block's output"
            return block
        block.stream_in = previous_out
    else:
        shape = _shape(block.stream_out)
        candidates = [a for a in external if _shape(a) == shape and _shape(a) is not None]
        tensors = [a for a in external if _shape(a) is not None]
        if not candidates:
            if len(tensors) == 1:  # a downsampling block: it starts the stack
                block.stream_in = tensors[0]
                block.changes_shape = True
            block.problem = "it changes the shape of the stream"
            return block
        block.stream_in = candidates[0]
    _walk_spine(gm, block)
    return block


def _shape(node: torch.fx.Node):
    return tensor_shape(node)


def _is_add(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _ADDS


def _add_operands(node: torch.fx.Node) -> tuple:
    """``(first, second, alpha)`` of an add computing ``first + alpha * second``.

    The operands may be keywords (``torch.add(x, other=y)``); ``torch.add``'s deprecated
    ``add(input, alpha, other)`` puts alpha in the middle.
    """
    args, kwargs = node.args, node.kwargs
    if len(args) == 3 and not isinstance(args[1], torch.fx.Node):
        return args[0], args[2], args[1]
    first = args[0] if args else kwargs.get("input", kwargs.get("self"))
    second = args[1] if len(args) > 1 else kwargs.get("other")
    return first, second, kwargs.get("alpha", 1)


def _is_one(value) -> bool:
    return isinstance(value, (int, float)) and value == 1


def _is_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _NORM_MODULES)
    return node.op == "call_function" and node.target in _NORM_FUNCTIONS



def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.target in (F.relu, torch.relu, "relu", aten.relu.default, aten.relu_.default)


def _passes_through(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_THROUGH_MODULES)
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    return node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS


def _walk_spine(gm: torch.fx.GraphModule, block: Block) -> None:
    def on_spine(v) -> bool:
        if v is block.stream_in:
            return True
        if not isinstance(v, torch.fx.Node) or v not in set(block.nodes):
            return False
        if _is_add(v):
            return any(on_spine(a) for a in _add_operands(v)[:2])
        if _is_norm(gm, v) or _passes_through(gm, v):
            return on_spine(v.args[0])
        return False

    node = block.stream_out
    seen_add = False
    while node is not block.stream_in:
        if _is_add(node):
            a, b, alpha = _add_operands(node)
            spine = [x for x in (a, b) if on_spine(x)]
            if len(spine) != 1:
                _refuse(block, node, f"'{node.name}' is not a residual add of the stream and "
                        "a branch")
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
            if not _branch_ends(gm, block, branch):
                return
            seen_add = True
            node = spine[0]
        elif _is_norm(gm, node):
            block.spine_norms.insert(0, node)
            node = node.args[0]
        elif node is block.stream_out and _is_relu(gm, node):
            block.spine_relu = True
            node = node.args[0]
        elif _passes_through(gm, node):
            node = node.args[0]
        else:
            _refuse(block, node, f"'{node.name}' on the path from the block's output to its "
                    "input is neither a residual add nor a norm")
            return
    if not seen_add:
        _refuse(block, None, "it has no residual add")


# the block computes something other than stream + branches: no zero branch makes it x
_COMBINATION_FIX = ("write the block as x + f(x) (a plain residual add of the stream and a "
                    "branch ending in a Linear/Conv layer; norms may wrap it: norm(x + f(x)))")


def _refuse(block: Block, node: torch.fx.Node | None, reason: str,
            fix: str = _COMBINATION_FIX) -> None:
    block.problem, block.problem_node, block.fix = reason, node, fix


def _branch_ends(gm: torch.fx.GraphModule, block: Block, value) -> bool:
    """Find the weighted layers that end a branch; False (with a problem) if there are none."""
    node = value
    while isinstance(node, torch.fx.Node):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                bias = f"{node.target}.bias" if module.bias is not None else None
                block.branch_ends.append(BranchEnd(node, f"{node.target}.weight", bias))
                return True
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                block.branch_ends.append(BranchEnd(node, f"{node.target}.weight",
                                                   f"{node.target}.bias", kind="norm"))
                return True
            if isinstance(module, _PASS_THROUGH_MODULES):
                node = node.args[0]
                continue
        if node.op == "call_function" and node.target is operator.getitem and \
                node.args[1] == 0 and node.args[0].op == "call_module" and isinstance(
                    gm.get_submodule(node.args[0].target), nn.MultiheadAttention):
            mha = node.args[0].target
            bias = f"{mha}.out_proj.bias" if gm.get_submodule(mha).out_proj.bias is not None \
                else None
            block.branch_ends.append(BranchEnd(node.args[0], f"{mha}.out_proj.weight", bias))
            return True
        if node.op == "call_function" and node.target is aten.batch_norm.default and all(
                isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in node.args[1:3]):
            # a torch.export graph's BatchNorm: aten.batch_norm(x, weight, bias, mean, var, ...)
            block.branch_ends.append(BranchEnd(node, node.args[1].target, node.args[2].target,
                                               kind="norm"))
            return True
        if node.op == "call_function" and node.target in (F.linear, aten.linear.default) \
                and node.args[1].op == "get_attr":
            bias = node.args[2].target if len(node.args) > 2 and isinstance(
                node.args[2], torch.fx.Node) else None
            block.branch_ends.append(BranchEnd(node, node.args[1].target, bias))
            return True
        if node.op == "call_function" and node.target in (torch.addmm, aten.addmm.default) \
                and node.args[2].op == "get_attr":  # GPT-2's Conv1D: b + x @ W
            bias = node.args[0].target if isinstance(node.args[0], torch.fx.Node) else None
            block.branch_ends.append(BranchEnd(node, node.args[2].target, bias))
            return True
        if _is_add(node):  # alpha scales the second operand: zero stays zero
            return all(_branch_ends(gm, block, a) for a in _add_operands(node)[:2])
        if node.op in ("call_function", "call_method") and node.target in _MULS:
            tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)
                       and a.op != "get_attr"]
            # layer scale or a constant factor: zero stays zero; but c / branch does not
            divides_by_branch = node.target in _DIVS and tensors[:1] != list(node.args[:1])
            if len(tensors) == 1 and not divides_by_branch:
                node = tensors[0]
                continue
        if _passes_through(gm, node):
            node = node.args[0]
            continue
        break
    name = value.name if isinstance(value, torch.fx.Node) else repr(value)
    _refuse(block, value if isinstance(value, torch.fx.Node) else None,
            f"the residual branch ending at '{name}' does not end in a layer with weights "
            "(Linear, Conv, MultiheadAttention) that can write zero",
            fix=_BRANCH_END_FIX)
    return False


_BRANCH_END_FIX = "restructure the block so every residual branch ends in a Linear/Conv layer"


def _kind(gm: torch.fx.GraphModule, block: Block) -> str:
    if block.spine_norms and block.spine_norms[-1] is block.stream_out:
        return "post_ln"
    if any(_is_norm(gm, n) for n in block.nodes) and not any(
            e.kind == "norm" for e in block.branch_ends):
        return "pre_ln"
    return "residual"
