"""Rules for normalization over channels: BatchNorm, InstanceNorm and GroupNorm.

BatchNorm (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``F.batch_norm``,
``aten.batch_norm``) and InstanceNorm (``nn.InstanceNorm1d/2d/3d``, ``F.instance_norm``,
``aten.instance_norm``) compute their statistics
**per channel** (over the batch and positions, or over the positions of one sample), then
apply a per-channel affine map: ``y[:, c] = (x[:, c] - mu_c) / sqrt(var_c + eps) * w_c + b_c``.
Channel ``c'`` of the grown model copies channel ``c' % C`` (circ form): its statistics are
the same numbers, in eval mode (``running_mean``/``running_var``) and in train mode (batch
statistics of identical values), so copying every per-channel tensor (weight, bias,
running mean, running var) by the channel's index map is exact, and the running stats keep
being copies while training updates them. ``num_batches_tracked`` is a scalar and untouched.
The other forms are refused at non-multiple widths: an avg extra channel holds the mean of
the channels, whose statistics are not the mean of theirs.

GroupNorm (``nn.GroupNorm``, ``F.group_norm``) normalizes each group of ``P = C/G``
channels together: the channel axis is ``[G, P]`` (outer ``G``), and growth is **by whole
groups**: ``G`` grows, ``P`` is fixed (a plan counts this width in groups), and group
``g'`` copies group ``g' % G`` (circ), so its statistics are its source's and the affine
``weight``/``bias`` are copied by the ``[G, P]`` index map; ``num_groups`` is rewritten.
With a single group (``G = 1``: one normalization over all channels and positions) there
is no group to copy: the channels grow only by a whole multiple ``k`` (every channel
``k`` times keeps the mean and the variance), and other widths are refused.

Refuses:
- BatchNorm/InstanceNorm channels at a non-multiple width where another op on the axis
  needs the avg or zero form: statistics are per channel, so channels are copied (circ);
- GroupNorm channels at a non-multiple number of groups where another op on the axis
  needs the avg or zero form: whole groups are copied (circ);
- GroupNorm with one group at a width that is not a whole multiple of the channels;
- a per-channel tensor of a functional norm (weight, bias, running mean or var)
  computed at run time, when the channels grow: make it an ``nn.Parameter`` or a buffer.

The channels of one group of a GroupNorm keep their count (a plan counts that width in
groups). A subclass of one of these modules with its own ``forward`` gets no rule from it
(see ``lemon_fx.registry``) and is traced through.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lemon_fx.analysis.registry import Registry
from lemon_fx.analysis.rule import BranchEnd, Rule, argument, parameter_name
from lemon_fx.analysis.width import AxisUse, NodeAnalysis
from lemon_fx.axes.vocabulary import ONLY_CIRC
from lemon_fx.resolution.rewrite import NodeRewrite

__all__ = ["BatchNormRule", "GroupNormRule", "register_rules"]

_aten = torch.ops.aten
# Where the per-channel tensors sit among a functional spelling's arguments: torch.nn.functional
# and ATen (the torch.export graphs) order them differently.
_FUNCTIONAL_ORDER = (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4))
_ATEN_ORDER = (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4))
PER_CHANNEL_ARGS = {
    F.batch_norm: _FUNCTIONAL_ORDER,
    F.instance_norm: _FUNCTIONAL_ORDER,
    _aten.batch_norm.default: _ATEN_ORDER,
    _aten.instance_norm.default: _ATEN_ORDER,
}
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, *INSTANCE_NORMS)


def _channel_axis(node: torch.fx.Node, ctx: NodeAnalysis | NodeRewrite) -> int:
    """Axis 1, except an unbatched InstanceNorm input ``[C, *spatial]``."""
    for spatial, cls in enumerate(INSTANCE_NORMS, start=1):
        if isinstance(ctx.module, cls):
            return 0 if len(ctx.dims(ctx.arg(0, "input"))) == spatial + 1 else 1
    return 1


def _claim_per_channel(ctx: NodeAnalysis, tensors: list[tuple[str | None, object]],
                       channel: int, out_slot) -> None:
    """Unify every per-channel tensor with the channel axis and expand it in its form.

    ``tensors`` holds (qualified name, None) for a module's own tensors, or (None, arg) for a
    functional argument (a ``get_attr`` node, or a tensor computed at run time).
    """
    for name, arg in tensors:
        if name is None:
            if not ctx.is_tensor(arg):
                continue
            if arg.op != "get_attr":
                ctx.forbid_growth(ctx.dims(arg), "a per-channel tensor of the norm is computed "
                                  "at run time", "make it an nn.Parameter or a buffer, or keep "
                                  "these channels fixed")
                continue
            name, dims = arg.target, ctx.dims(arg)
        else:
            dims = ctx.param_dims(name)
        ctx.unify(dims[0], channel)
        ctx.claim(name, [AxisUse("expand", out_slot)])


class BatchNormRule(Rule):
    """Per-channel statistics and affine map: every axis passes through, channels circ.

    With an affine weight and bias (parameters) it may end a residual branch, as in a
    ResNet block: ``gamma = beta = 0`` writes zero.
    """

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        ctx.pass_through(x, node)
        axis = _channel_axis(node, ctx)
        channel = ctx.dims(x)[axis]
        ctx.require_form(ctx.slot(x, axis), ONLY_CIRC, f"{self._kind(ctx)} computes statistics "
                         "per channel and needs its channels in the circ form")
        out_slot = ctx.slot(node, axis)
        if ctx.module is not None:
            tensors = [(ctx.param(attr), None) for attr in
                       ("weight", "bias", "running_mean", "running_var")
                       if getattr(ctx.module, attr, None) is not None]
        else:
            tensors = [(None, ctx.arg(i, name)) for name, i in PER_CHANNEL_ARGS[node.target]]
        _claim_per_channel(ctx, tensors, channel, out_slot)

    def branch_end(self, node: torch.fx.Node, root: torch.nn.Module) -> BranchEnd | None:
        """``y = gamma * n(x) + beta`` is 0 with ``gamma = beta = 0``: a ``"norm"`` end
        when both are parameters (an affine module, or ``get_attr`` arguments)."""
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            if getattr(module, "weight", None) is None or getattr(module, "bias", None) is None:
                return None
            return BranchEnd(node, f"{node.target}.weight", f"{node.target}.bias", kind="norm")
        positions = dict(PER_CHANNEL_ARGS[node.target])
        weight = parameter_name(argument(node, positions["weight"], "weight"))
        bias = parameter_name(argument(node, positions["bias"], "bias"))
        if weight is None or bias is None:
            return None
        return BranchEnd(node, weight, bias, kind="norm")

    def _kind(self, ctx: NodeAnalysis) -> str:
        if ctx.module is not None:
            return type(ctx.module).__name__
        instance = (F.instance_norm, _aten.instance_norm.default)
        return "instance_norm" if ctx.node.target in instance else "batch_norm"

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        if ctx.module is None:
            return
        channel = ctx.dims(ctx.arg(0, "input"))[_channel_axis(node, ctx)]
        ctx.set_attr("num_features", ctx.grown(channel))


class GroupNormRule(Rule):
    """Channels ``[G, P]``: whole groups copied (circ), ``P`` fixed; one group: whole multiples."""

    def _groups(self, ctx: NodeAnalysis | NodeRewrite) -> int:
        if ctx.module is not None:
            return ctx.module.num_groups
        return ctx.value(ctx.arg(1, "num_groups"))

    def analyze(self, node: torch.fx.Node, ctx: NodeAnalysis) -> None:
        x = ctx.arg(0, "input")
        ctx.pass_through(x, node)
        channel = ctx.dims(x)[1]
        groups = self._groups(ctx)
        per_group = ctx.shape(x)[1] // groups
        if groups == 1:
            ctx.forbid_growth(channel, "GroupNorm with one group normalizes over all "
                              "channels together, and only whole copies of every channel "
                              "keep its mean and variance",
                              "grow these channels by a whole multiple (2x, 3x, ...), or use "
                              "more groups", kind="not_lossless", whole_multiples_ok=True)
        else:
            g, p = ctx.new_dim(groups), ctx.new_dim(per_group)
            ctx.fix(p, "the channels of one group of a GroupNorm: statistics are per group, "
                    "so it grows by whole groups and a plan counts this width in groups")
            ctx.factor(channel, [g, p])
            ctx.require_form(ctx.slot(x, 1), ONLY_CIRC, "GroupNorm computes statistics per group "
                             "and needs whole groups copied in the circ form")
        out_slot = ctx.slot(node, 1)
        if ctx.module is not None:
            tensors = [(ctx.param(attr), None) for attr in ("weight", "bias")
                       if getattr(ctx.module, attr, None) is not None]
        else:
            tensors = [(None, ctx.arg(2, "weight")), (None, ctx.arg(3, "bias"))]
        _claim_per_channel(ctx, tensors, channel, out_slot)

    def rewrite(self, node: torch.fx.Node, ctx: NodeRewrite) -> None:
        x = ctx.arg(0, "input")
        channels = ctx.shape(x)[1]
        grown = ctx.grown(ctx.dims(x)[1])
        groups = self._groups(ctx)
        new_groups = 1 if groups == 1 else grown // (channels // groups)
        if ctx.module is not None:
            ctx.set_attr("num_channels", grown)
            ctx.set_attr("num_groups", new_groups)
        elif new_groups != groups:
            ctx.set_arg(1, "num_groups", new_groups)


def register_rules(registry: Registry) -> None:
    registry.add(BatchNormRule(), [*BATCH_NORMS, *PER_CHANNEL_ARGS])
    registry.add(GroupNormRule(), [nn.GroupNorm, F.group_norm,
                                   torch.ops.aten.group_norm.default])
