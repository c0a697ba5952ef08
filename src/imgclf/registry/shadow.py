"""What real traffic says of a challenger: the shadow runs `imgclf serve --shadow` records, summed.

Each shadow run compares one served (primary) version with one shadow version on the same requests; its
latest `images` and `agreed` metrics are the totals so far. The evidence for promoting version N is the sum
over the runs where N shadowed the version in production now: agreement with another version says nothing
about the switch at hand. The gate and `promote` both ask `shadow_check` (when register.shadow.min_requests > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

RUN_KIND = "shadow"
ARTIFACTS = "shadow"  # a shadow run's folder of files
# the tags a shadow run carries (written by imgclf.serve.shadow, read here and by shadow-report)
SHADOW_NAME, SHADOW_VERSION, SHADOW_URI = "shadow.model.name", "shadow.model.version", "shadow.model.uri"
PRIMARY_NAME, PRIMARY_VERSION, PRIMARY_URI = "primary.model.name", "primary.model.version", "primary.model.uri"


def experiment_name(experiment: str) -> str:
    """Shadow runs live beside the trainings, in an experiment of their own (as inference runs do)."""
    return f"{experiment}-shadow"


@dataclass(frozen=True)
class Evidence:
    version: str
    production: str
    images: int  # scored by both (a multipart request of five files counts five)
    agreed: int
    runs: list[str]

    @property
    def agreement(self) -> Optional[float]:
        return self.agreed / self.images if self.images else None

    def text(self) -> str:
        if not self.images:
            return f"no shadow traffic for v{self.version} against production v{self.production}"
        return (f"{self.images} images of shadow traffic for v{self.version} against production v{self.production}, "
                f"agreement {self.agreement:.2%} ({len(self.runs)} run(s))")


def shadow_runs(client, experiment: str, name: str, version: Optional[str] = None,
                production: Optional[str] = None) -> list:
    """The shadow runs of `name` (version N shadowing, against `production`), oldest first."""
    exp = client.get_experiment_by_name(experiment_name(experiment))
    if exp is None:
        return []
    where = [f"tags.run_kind = '{RUN_KIND}'", f"tags.`{SHADOW_NAME}` = '{name}'"]
    if version is not None:
        where.append(f"tags.`{SHADOW_VERSION}` = '{version}'")
    if production is not None:
        where.append(f"tags.`{PRIMARY_VERSION}` = '{production}'")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], " and ".join(where), max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def evidence(client, experiment: str, name: str, version: str, production: str) -> Evidence:
    runs = [r for r in shadow_runs(client, experiment, name, version, production)
            if r.data.tags.get(PRIMARY_NAME) == name]
    images = sum(int(r.data.metrics.get("images", 0)) for r in runs)
    agreed = sum(int(r.data.metrics.get("agreed", 0)) for r in runs)
    return Evidence(str(version), str(production), images, agreed, [r.info.run_id for r in runs])


def shadow_check(client, experiment: str, name: str, version: str, production: Optional[str], min_images: int,
                 min_agreement: float):
    """The gate's check that real traffic vouched for `version` against `production`; None when none is
    required (register.shadow.min_requests 0, no production yet, or the version is production)."""
    from .gate import Check

    if min_images <= 0 or production is None or str(production) == str(version):
        return None
    ev = evidence(client, experiment, name, version, production)
    limit = f">= register.shadow.min_requests {min_images}, agreement >= {min_agreement:.2%}"
    return Check("shadow", ev.text(), limit, ev.images >= min_images and (ev.agreement or 0.0) >= min_agreement)
