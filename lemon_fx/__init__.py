"""lemon_fx: grow a trained small PyTorch model into a larger one that computes the same
function (LEMON, Wang et al. 2024), as a torch.fx graph rewrite verified with onnxruntime.

    gm = lemon_fx.trace(model, example_inputs)
    print(lemon_fx.inspect(gm))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    lemon_fx.verify(gm, big, fresh_inputs, onnx=True)
"""

from lemon_fx.analysis import AxisUse
from lemon_fx.errors import (
    LemonError,
    NotLosslessError,
    PlanError,
    Problem,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from lemon_fx.groups import WidthGroup
from lemon_fx.grow import GrowthReport, grow, growth_report
from lemon_fx.plan import Plan
from lemon_fx.registry import register
from lemon_fx.report import InspectReport, inspect
from lemon_fx.rule import Rule
from lemon_fx.schedule import LemonSchedule, lemon_lr_factor
from lemon_fx.stacks import BlockStack
from lemon_fx.tracing import trace

__all__ = [
    "AxisUse",
    "BlockStack",
    "InspectReport",
    "LemonSchedule",
    "LemonError",
    "NotLosslessError",
    "Plan",
    "PlanError",
    "Problem",
    "Rule",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "WidthGroup",
    "GrowthReport",
    "export_onnx",
    "grow",
    "growth_report",
    "inspect",
    "lemon_lr_factor",
    "register",
    "trace",
    "verify",
]


def verify(*args, **kwargs):
    """See ``lemon_fx.verification.verify``."""
    from lemon_fx.verification import verify as _verify

    return _verify(*args, **kwargs)


def export_onnx(*args, **kwargs):
    """See ``lemon_fx.onnx_export.export_onnx``."""
    from lemon_fx.onnx_export import export_onnx as _export

    return _export(*args, **kwargs)
