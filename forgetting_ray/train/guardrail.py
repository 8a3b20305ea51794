"""The training guardrail: watches each optimizer step's NLLs and backs lambda off or stops the run.

Plain logic (no Ray, no DeepSpeed): the worker loop applies its decisions and keeps its state in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_BACKOFFS = 10  # lambda multiplier 2**-10 ~ 1e-3: halving further cannot rescue a run
GUARDRAIL_CODES = {"none": 0, "backoff": 1, "stop": 2}  # metrics stay numeric (MLflow); reasons go to events


@dataclass
class GuardrailDecision:
    action: str  # "none" | "backoff" | "stop"
    reason: str = ""


@dataclass
class Guardrail:
    """Watches the step's negative and positive NLL; backs lambda off or stops the run.

    ``neg_nll_max``: the forgetting term is unbounded gradient ascent (docs/method.md §11.6), so a
    negative-token NLL past this value means it is running away.  ``pos_factor``: the positive NLL
    above ``pos_factor`` x its first value means training diverges.  A non-finite loss always stops.
    """

    neg_nll_max: float | None = None
    pos_factor: float | None = None
    action: str = "backoff"
    pos_baseline: float | None = None
    backoffs: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"pos_baseline": self.pos_baseline, "backoffs": self.backoffs, "events": list(self.events)}

    def load(self, state: dict[str, Any]) -> None:
        self.pos_baseline = state.get("pos_baseline")
        self.backoffs = int(state.get("backoffs", 0))
        self.events = list(state.get("events", []))

    def check(self, step: int, *, loss: float, pos_nll: float, neg_nll: float, n_pos: int, n_neg: int,
              can_backoff: bool) -> GuardrailDecision:
        if not math.isfinite(loss):
            return self._record(step, "stop", f"non-finite loss {loss} at step {step}")
        if self.pos_baseline is None and n_pos > 0:
            self.pos_baseline = pos_nll
        breach = ""
        if self.neg_nll_max is not None and n_neg > 0 and neg_nll > self.neg_nll_max:
            breach = f"negative-token NLL {neg_nll:.4g} > guardrail_neg_nll_max {self.neg_nll_max:.4g}"
        elif (self.pos_factor is not None and self.pos_baseline is not None and n_pos > 0
              and pos_nll > self.pos_factor * self.pos_baseline):
            breach = (f"positive-token NLL {pos_nll:.4g} > guardrail_pos_nll_factor {self.pos_factor:g} x "
                      f"first value {self.pos_baseline:.4g}")
        if not breach:
            return GuardrailDecision("none")
        if self.action == "backoff" and can_backoff and self.backoffs < MAX_BACKOFFS:
            self.backoffs += 1
            return self._record(step, "backoff", f"{breach} at step {step}: lambda multiplier halved "
                                                 f"to {0.5 ** self.backoffs:g}")
        why = "guardrail_action is 'stop'" if self.action == "stop" else (
            "lambda cannot be backed off further" if can_backoff else "no lambda to back off for this strategy")
        return self._record(step, "stop", f"{breach} at step {step} ({why})")

    def _record(self, step: int, action: str, reason: str) -> GuardrailDecision:
        self.events.append({"step": step, "action": action, "reason": reason})
        return GuardrailDecision(action, reason)
