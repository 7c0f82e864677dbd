"""lemon_fx: grow a trained small PyTorch model into a larger one that computes the same
function (LEMON, Wang et al. 2024), as a torch.fx graph rewrite verified with onnxruntime.

    gm = lemon_fx.trace(model, example_inputs)
    print(lemon_fx.inspect(gm))
    big = lemon_fx.grow(gm, lemon_fx.Plan(width=2.0))
    lemon_fx.verify(gm, big, fresh_inputs, onnx=True)
"""

from lemon_fx.analysis.groups import WidthGroup
from lemon_fx.analysis.report import InspectReport
from lemon_fx.analysis.rule import BranchEnd, Rule
from lemon_fx.analysis.stacks import BlockStack
from lemon_fx.analysis.width import AxisUse
from lemon_fx.api import (
    GrowthReport,
    grow,
    growth_report,
    inspect,
    plan_growth,
    register,
    trace,
)
from lemon_fx.errors import (
    LemonError,
    NotLosslessError,
    PlanError,
    Problem,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from lemon_fx.hub import grow_pretrained
from lemon_fx.plan import Plan
from lemon_fx.recipe.recipe import GrowthRecipe
from lemon_fx.training.schedule import LemonSchedule, lemon_lr_factor
from lemon_fx.verification.onnx_export import export_onnx
from lemon_fx.verification.verify import verify

__all__ = [
    "AxisUse",
    "BlockStack",
    "BranchEnd",
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
    "GrowthRecipe",
    "grow",
    "grow_pretrained",
    "plan_growth",
    "growth_report",
    "inspect",
    "lemon_lr_factor",
    "register",
    "trace",
    "verify",
]

