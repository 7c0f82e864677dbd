"""``grow``'s last guard: the grown model must give the source's outputs on the example
inputs before ``grow`` hands it out.

Every refusal is meant to come from the analysis, before anything is built; this catches a
rule that is wrong about its op (a user's rule included) instead of returning a different
model. Both models run once, in eval mode, as they are (no dtype cast: a model that mixes
float64 and float32 layers runs as written), and are held to ``verify``'s tolerance for
the coarsest floating dtype the weights have or the graph computes in (a float64 model
that casts to float32 inside, as Hugging Face's RMSNorm does, is float32-accurate). Their
buffers and train/eval flags are left as they were.

A model that draws random numbers in eval mode cannot be checked this way; when the
source disagrees with itself, the check is skipped and a note says so. One input proves
nothing about others: ``lemon_fx.verify`` on fresh inputs remains the user's check.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lemon_fx.errors import Problem, VerificationError
from lemon_fx.tracing.graph_facts import computed_dtypes, preserved_state, record_facts
from lemon_fx.verification.compare import BUG_FIX, DEFAULT_TOLERANCES, compare_outputs

__all__ = ["check_on_example"]

RANDOM_NOTE = ("not checked on the example inputs: the source model gives different outputs "
               "on the same inputs in eval mode (it draws random numbers); check the grown "
               "model with lemon_fx.verify under a fixed seed")


def check_on_example(source: torch.fx.GraphModule, grown: torch.fx.GraphModule,
                     inputs: tuple[Any, ...], *, leading: bool = False,
                     record_grown: bool = False) -> list[str]:
    """Raise ``VerificationError`` if ``grown`` differs from ``source`` on ``inputs``;
    return notes for the growth report (empty when the check passed). ``record_grown``:
    the grown model's run also records its shapes (``record_facts``), so that it can be
    inspected or grown again without running it a second time."""
    dtypes = {t.dtype for t in source.parameters() if t.is_floating_point()}
    dtypes |= computed_dtypes(source)
    coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32
    rtol, atol = DEFAULT_TOLERANCES.get(coarsest, DEFAULT_TOLERANCES[torch.float32])
    want = _outputs(source, inputs, "source")
    got = _outputs(grown, inputs, "grown", record=record_grown)
    # with grow_outputs (``leading``) the leading part of each grown output is the source's
    failed = [c for c in compare_outputs(want, got, rtol=rtol, atol=atol, leading=leading)
              if not c.passed]
    if not failed:
        return []
    again = _outputs(source, inputs, "source")
    if not all(c.passed for c in compare_outputs(want, again, rtol=0.0, atol=0.0)):
        return [RANDOM_NOTE]
    raise VerificationError(
        "the grown model does not compute the source model's function on the example "
        f"inputs (checked by grow before returning it; rtol={rtol:g}, atol={atol:g})",
        [Problem(reason=c.reason or f"{c.name} (shape {list(c.shape)}): max abs error "
                 f"{c.max_abs_error:.3e}, allowed {c.tolerance:.3e}", fix=BUG_FIX)
         for c in failed])


def _outputs(module: torch.nn.Module, inputs: tuple[Any, ...], role: str,
             record: bool = False) -> Any:
    try:
        if record:
            return record_facts(module, inputs, eval_mode=True)
        with torch.no_grad(), preserved_state(module, eval_mode=True):
            return module(*inputs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise VerificationError(
            f"the {role} model failed to run on the example inputs",
            [Problem(reason=f"{type(exc).__name__}: {first}", fix=BUG_FIX)]) from exc
