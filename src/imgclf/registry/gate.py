"""The promotion gate: a challenger moves `production` when its register.metric reaches register.min_score
and beats production's, both scored by the same scorer on the same test split, every trust check passes
(calibration, behavioural tests, the data checks of its data, the image-by-image comparison with production
of registry/paired.py where its limits are set) and, where register.shadow asks for it, real
traffic vouched for it against production (registry/shadow.py; until then it waits as challenger). The
decision, with a reason naming the metric and every check with its value, is written on the versions; the
move goes through registry.py. Each decision is counted against the test split it was taken on: past
register.max_test_reuse the gate still decides, and says the split has been chosen on too often.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from .versions import PRODUCTION, TEST_SPLIT_TAG, alias_version, decisions_on, move_production, utc_now


@dataclass
class Check:
    """One requirement besides the metric, as the reason shows it: `ece 0.0041 (<= 0.05): pass`."""

    name: str
    value: str
    limit: str
    passed: bool

    def text(self) -> str:
        return f"{self.name} {self.value} ({self.limit}): {'pass' if self.passed else 'FAIL'}"


class Incomparable(ValueError):
    """Production and the challenger classify different things (class lists or input shapes differ)."""


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    metric: str  # register.metric: what both scores are
    challenger_score: float
    previous_production: Optional[str] = None  # the version that was production when the gate ran
    previous_production_score: Optional[float] = None  # scored on the challenger's test split
    checks: list[dict[str, Any]] = field(default_factory=list)
    awaiting_shadow: bool = False  # good enough, but real traffic has not vouched for it yet (register.shadow)
    test_reuse: Optional[dict[str, Any]] = None  # this decision's place among those taken on its test split

    def as_dict(self) -> dict[str, Any]:
        """With `production`: the version in production once the gate has run."""
        return {**asdict(self), "production": self.version if self.promoted else self.previous_production}


def gate(client, name: str, version: str, metric: str, challenger_score: float, min_score: float,
         min_improvement: float, score_production: Callable[[str], float], checks: list[Check] = (),
         shadow: Optional[Callable[[str], Optional[Check]]] = None,
         compare: Optional[Callable[[str], list[Check]]] = None, test_split: Optional[str] = None,
         max_test_reuse: Optional[int] = None) -> Decision:
    """Promote `version` when its `metric` reaches min_score and beats production's on the same test split,
    and every check passes (a better challenger that fails one is registered, not promoted).

    `score_production(model_uri)` scores the current production model with the scorer that scored the
    challenger, on the challenger's test split: numbers stored with production may come from other data.
    `shadow(production_version)`: the shadow-traffic check against that version, None when none is required.
    `compare(production_version)`: checks of the two models image by image (registry/paired.py), once
    production was scored.
    `test_split`: the test split's sha256; the decision is counted against it, and past `max_test_reuse`
    decisions on it the reason warns (the decision stands).
    """
    prod = alias_version(client, name, PRODUCTION)
    traffic = shadow(prod) if shadow is not None and prod is not None and prod != str(version) else None
    checks = [*checks, traffic] if traffic is not None else list(checks)
    decision = Decision(str(version), False, "", metric, challenger_score, prod, checks=[asdict(c) for c in checks])
    if prod == str(version):
        decision.promoted, decision.reason = True, f"version {version} is already production"
        return decision
    if challenger_score < min_score:
        decision.reason = f"{metric} {challenger_score:.4%} is below register.min_score {min_score:.4%}"
    elif prod is None:
        decision.promoted = True
        decision.reason = f"first model to pass register.min_score ({metric} {challenger_score:.4%} >= {min_score:.4%})"
    else:
        try:
            prod_score = score_production(f"models:/{name}/{prod}")
        except Incomparable as exc:
            decision.reason = (f"production v{prod} cannot be compared with this model ({exc}); registered, not "
                               "promoted: promote by hand if the new task is intended")
        except Exception as exc:
            decision.reason = (f"production version {prod} could not be scored on this test split "
                               f"({type(exc).__name__}: {str(exc)[:200]}); promote by hand if intended")
        else:
            decision.previous_production_score = prod_score
            if compare is not None:
                per_image = compare(prod)
                checks += per_image
                decision.checks += [asdict(c) for c in per_image]
            gain = challenger_score - prod_score
            if gain > 0 and gain >= min_improvement:
                decision.promoted = True
                decision.reason = (f"{metric} beats production v{prod} by {gain:+.4%} ({challenger_score:.4%} vs "
                                   f"{prod_score:.4%}; register.min_improvement {min_improvement:.4%})")
            else:
                decision.reason = (f"{metric} not better than production v{prod} by register.min_improvement "
                                   f"{min_improvement:.4%} ({challenger_score:.4%} vs {prod_score:.4%} on the same "
                                   "test split)")
    failing = [c for c in checks if not c.passed]
    if decision.promoted and failing == [traffic]:
        decision.promoted, decision.awaiting_shadow = False, True
        decision.reason += (f"; but real traffic has not vouched for it yet ({traffic.value}): it waits as challenger "
                            f"(`imgclf serve --shadow challenger`, then `imgclf promote --version {version}`)")
    elif decision.promoted and failing:
        decision.promoted = False
        decision.reason += (f"; but {len(failing)} trust check(s) failed ({'; '.join(c.text() for c in failing)}): "
                            "registered, not promoted")
    tags = {}
    if test_split is not None:
        decision.test_reuse = reuse(client, test_split, name, str(version), max_test_reuse)
        decision.reason += f"; {decision.test_reuse['text']}"
        tags = {TEST_SPLIT_TAG: test_split, "gate.test_reuse": decision.test_reuse["text"]}
    if checks:
        decision.reason += " | checks: " + "; ".join(c.text() for c in checks)
    verdict = "promoted" if decision.promoted else "awaiting-shadow" if decision.awaiting_shadow else "rejected"
    tags = {"gate.decision": verdict, "gate.reason": decision.reason[:4900], "gate.at": utc_now(), **tags}
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    if decision.promoted:
        move_production(client, name, str(version), decision.reason, action="gate")
    elif prod is not None:
        client.set_model_version_tag(name, prod, "gate.last_challenge",
                                     f"v{version} {verdict} at {tags['gate.at']}: {decision.reason}")
    return decision


def reuse(client, test_split: str, name: str, version: str, limit: Optional[int]) -> dict[str, Any]:
    """This decision counted with those taken on the same test split before it, and the warning past `limit`."""
    before, promoted = decisions_on(client, test_split, name, version)
    text = f"test split {test_split[:12]} has now decided {before + 1} gate decision(s) ({promoted} promoted before)"
    warning = None
    if limit is not None and before + 1 > limit:
        warning = (f"it has decided more than register.max_test_reuse {limit}: choices made on it start to fit it; "
                   "refresh it with new test images (for an imagefolder, a new data.seed also draws another test split)")
        text += f"; WARNING: {warning}"
    return {"split": test_split, "decisions": before + 1, "promotions_before": promoted, "max": limit,
            "warning": warning, "text": text}
