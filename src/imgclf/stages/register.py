"""register and promote: registry versions, the promotion gate, and the production alias moved by hand."""

from __future__ import annotations

import logging
import time
from typing import Optional

from ..config import Config
from ..layout import Layout
from ..schema import ConfigError
from . import holds_outputs, records_in_dvc_lock

log = logging.getLogger("imgclf")


def _current_evaluation(cfg: Config, layout: Layout) -> dict:
    """evaluate's record, refused unless it is of the run train recorded last and of the current test split."""
    from ..data.batches import read_meta
    from ..files import read_json_file
    from ..tracking.runs import check_same_store, load_run_ref

    if not layout.logged_model.is_file():
        raise FileNotFoundError(f"{layout.logged_model}: no logged model; run the evaluate stage first")
    ref = read_json_file(layout.logged_model)
    trained = load_run_ref(layout.run_ref)
    if trained is not None:
        check_same_store(trained, cfg, layout.run_ref)
    if trained is None or trained["run_id"] != ref["run_id"] or trained.get("best_sha256") != ref.get("best_sha256"):
        last = trained["run_id"] if trained else "none"
        raise ValueError(f"{layout.logged_model}: evaluation of run {ref['run_id']}, but the last finished training "
                         f"was run {last} ({layout.run_ref}); run the evaluate stage first")
    test_file = layout.split("test").name
    current = read_meta(layout.meta, cfg.data)["sha256"].get(test_file)
    if ref.get("data_sha256", {}).get(test_file) != current:
        raise ValueError(f"{layout.logged_model}: run {ref['run_id']} was evaluated on another test split than "
                         f"{layout.split('test')}; run the evaluate stage again")
    return ref


def trust_checks(cfg: Config, ref: dict, meta: dict) -> list:
    """What the gate requires besides the metric: served calibration within register.max_ece, every gated
    behavioural test within its max_drop, and no failed data check (even one set to warn) on this data."""
    from ..registry.gate import Check

    trust = ref.get("trust")
    if not isinstance(trust, dict):
        return [Check("trust", "not measured", "evaluated by an imgclf without calibration: run evaluate", False)]
    limit = cfg.register.max_ece
    checks = [Check("ece", f"{trust['ece']:.4f}", f"<= register.max_ece {limit:g}", trust["ece"] <= limit)]
    for r in trust["robustness"]:
        if r["max_drop"] is not None:
            checks.append(Check(f"robust.{r['test']}", f"drop {r['drop']:+.2%}", f"<= {r['max_drop']:.2%}", r["passed"]))
    checks += _label_issue_check(cfg, meta)
    data = meta.get("checks")
    if data is None:
        checks.append(Check("data", "not checked", "prepared before data checks: run prepare", False))
    for c in data or []:
        if c["status"] != "off":
            ok = c["status"] == "passed"
            checks.append(Check(f"data.{c['name']}", "ok" if ok else f"failed: {c.get('detail', '')[:160]}",
                                f"set to {c['severity']}", ok))
    return checks


def _label_issue_check(cfg: Config, meta: dict) -> list:
    """register.label_issues: the last imgclf audit of exactly this prepared data (matched by the splits'
    sha256s, so an audit of other data never counts)."""
    from ..audit.record import of_this_data, shares
    from ..registry.gate import Check

    want = cfg.register.label_issues
    if want.severity == "off":
        return []
    limit = f"<= register.label_issues.max_share {want.max_share:.2%}, set to {want.severity}"
    audited = of_this_data(Layout.of(cfg).audit, meta["sha256"])
    if audited is None:
        return [Check("data.label_issues", "not audited (no imgclf audit of this prepared data: run it)", limit,
                      want.severity == "warn")]
    pool, test = shares(audited)
    ok = pool <= want.max_share and test <= want.max_share
    return [Check("data.label_issues", f"suspected label errors: train+val {pool:.2%}, test {test:.2%}", limit,
                  ok or want.severity == "warn")]


def _traffic(cfg: Config, client, version: str, production: Optional[str]):
    """register.shadow's check of `version` against `production` (None when not required)."""
    from ..registry.shadow import shadow_check

    want = cfg.register.shadow
    return shadow_check(client, cfg.tracking.experiment, cfg.model_name, version, production, want.min_requests,
                        want.min_agreement)


def _short(names: list[str]) -> str:
    return "[" + ", ".join(names[:5]) + (", …" if len(names) > 5 else "") + "]"


@holds_outputs("register")
@records_in_dvc_lock("register")
def register_stage(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    """Register the evaluated model as a new version (alias challenger), then run the promotion gate."""
    from ..data.batches import load_split, read_meta
    from ..evaluation.model_card import short_description
    from ..evaluation.scoring import evaluate
    from ..files import write_json
    from ..progress import heartbeat
    from ..registry import versions as registry
    from ..registry.gate import Incomparable, gate
    from ..registry.serving import LoadedModel
    from ..tracking.mlflow_internals import model_id_of
    from ..tracking.runs import stage_run
    from ..tracking.store import connect, logged_model_route, page, run_route, tracking_uri

    start = time.perf_counter()
    if not cfg.tracking.enabled:
        raise ValueError("runtime.tracking.enabled: the register stage needs MLflow (set it to true)")
    layout = Layout.of(cfg)
    ref = _current_evaluation(cfg, layout)
    uri = tracking_uri(cfg.tracking)
    client, _ = connect(cfg.tracking)
    test_metrics = ref["test"]
    run = client.get_run(ref["run_id"])
    if run.info.status != "FINISHED":
        raise ValueError(f"MLflow run {ref['run_id']} is {run.info.status}, not FINISHED; "
                         "it is not registered (run train and evaluate again)")
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith(("git.", "data.", "params.", "prefect.", "sweep."))}
    tags = {**lineage, **{f"test.{k}": str(v) for k, v in test_metrics.items()}, "model.kind": cfg.model.kind}
    model_id = model_id_of(ref["model_uri"])
    if model_id:  # MLflow's version page shows no metrics; the logged model's page has them with the test split
        tags["logged_model"] = page(uri, logged_model_route(run.info.experiment_id, model_id))
    run_link = page(uri, run_route(run.info.experiment_id, ref["run_id"]))
    description = (f"{cfg.model.kind} on {cfg.data.source} trained by MLflow run {ref['run_id']} ({run_link}): "
                   f"test accuracy {test_metrics['accuracy']:.4%}, macro F1 {test_metrics['macro_f1']:.4f}.")
    if ref.get("card"):  # the model card, so the registry page reads as one
        description = short_description(ref["card"], f"reports/model_card.md of run {ref['run_id']}")
    name = cfg.model_name
    version, created = registry.register_version(client, name, ref["model_uri"], ref["run_id"], tags, description)
    test = load_split(layout.split("test"))
    meta = read_meta(layout.meta, cfg.data)

    scored: dict = {}

    def score(model_uri: str) -> float:
        production = LoadedModel(model_uri, uri)
        if production.classes != meta["classes"] or production.in_shape != meta["image_shape"]:
            raise Incomparable(
                f"it has {len(production.classes)} classes {_short(production.classes)} and input "
                f"{production.in_shape}; this model {len(meta['classes'])} classes {_short(meta['classes'])} and "
                f"input {meta['image_shape']}")
        # The scorer evaluate used for the challenger, on the split its record was checked against above.
        scored["production"] = evaluate(production.network, test, meta["classes"], cfg.runtime.eval_batch_size)
        return scored["production"].metric(metric)

    def compare(production: str) -> list:
        """Image by image against production: the challenger as served, scored by the same scorer."""
        from ..console import one_line
        from ..registry.gate import Check
        from ..registry.paired import compare as paired
        from ..registry.paired import paired_checks

        want = cfg.register
        try:
            challenger = evaluate(LoadedModel(f"models:/{name}/{version}", uri).network, test, meta["classes"],
                                  cfg.runtime.eval_batch_size)
        except (LookupError, ValueError, OSError) as exc:  # not comparable: fails only where a limit asks for it
            required = any(v is not None for v in (want.significance, want.max_negative_flips, want.max_class_drop))
            return [Check("paired", f"not compared ({one_line(exc)[:200]})", "the registered version as served",
                          not required)]
        scored["paired"] = paired(test.labels.numpy(), challenger.predictions, scored["production"].predictions,
                                  meta["classes"], test.sample_ids())
        scored["challenger"], scored["production_version"] = challenger, production
        return paired_checks(scored["paired"], production, want.significance, want.max_negative_flips,
                             want.max_class_drop)

    metric = cfg.register.metric
    with heartbeat(log.info, f"register: the gate for {name} v{version} (re-scoring production on the test split)"):
        decision = gate(client, name, version, metric, test_metrics[metric], cfg.register.min_score,
                        cfg.register.min_improvement, score, trust_checks(cfg, ref, meta),
                        shadow=lambda production: _traffic(cfg, client, version, production), compare=compare,
                        test_split=meta["sha256"][layout.split("test").name],
                        max_test_reuse=cfg.register.max_test_reuse)
    if decision.test_reuse and decision.test_reuse["warning"]:
        log.warning("register: the test split %s", decision.test_reuse["text"].split(" ", 2)[2])
    flips = _write_flips(layout, test, meta["classes"], scored)
    if "paired" in scored:
        for key, value in _paired_tags(scored["paired"], scored["production_version"]).items():
            client.set_model_version_tag(name, version, key, value)
    with stage_run(cfg, "register", layout.run_ref, extra_tags=extra_tags, run_id=ref["run_id"]) as tracked:
        if tracked:
            tracked.set_tags({"registry.model": name, "registry.version": version,
                              "registry.promoted": str(decision.promoted).lower(), "registry.reason": decision.reason})
            for f in flips:  # with the decision, in the challenger's run
                tracked.log_artifact(f, f"gate/v{version}")
    was = f"v{decision.previous_production}" if decision.previous_production else "none"
    log.info("%s v%s %s (production before: %s): %s", name, version,
             "promoted to production" if decision.promoted else "not promoted", was, decision.reason)
    record = {**decision.as_dict(), "model": name, "created": created, "run_id": ref["run_id"],
              "experiment_id": run.info.experiment_id,
              "paired": scored["paired"].record() if "paired" in scored else None, "flips": [str(f) for f in flips]}
    write_json(layout.registered, record)
    return {**record, "seconds": round(time.perf_counter() - start, 3)}


def explain(cfg: Config) -> list[str]:
    """The last decision (models/registered.json) in full: the verdict, the metric against production, every
    check with its value and requirement, the test split's reuse and where the flipped images are."""
    from ..files import read_json_file

    path = Layout.of(cfg).registered
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no gate decision recorded here yet; run the register stage first")
    r = read_json_file(path)
    verdict = ("promoted to production" if r["promoted"] else "waits as challenger for shadow traffic"
               if r.get("awaiting_shadow") else "registered, not promoted")
    was = f"v{r['previous_production']}" if r.get("previous_production") else "none"
    prod = r.get("previous_production_score")
    rows = [("check", "value", "requirement", "result"),
            (r["metric"], f"{r['challenger_score']:.4%}",
             f"production {was}: {prod:.4%}" if prod is not None else f"production {was}", "")]
    rows += [(c["name"], c["value"], c["limit"], "pass" if c["passed"] else "FAIL") for c in r.get("checks", [])]
    widths = [min(max(len(row[i]) for row in rows), 60) for i in range(4)]
    lines = [f"{r['model']} v{r['version']}: {verdict} (production before: {was}, after: "
             f"v{r['production']})" if r.get("production") else f"{r['model']} v{r['version']}: {verdict}",
             f"reason: {r['reason'].split(' | checks: ')[0]}", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if r.get("test_reuse"):
        lines += ["", r["test_reuse"]["text"]]
    paired = r.get("paired")
    if paired:
        low, high = paired["macro_f1_ci"]
        lines += ["", f"against v{r['previous_production']}: {paired['fixed']} test images fixed, {paired['broken']} "
                      f"broken of {paired['n']} (p {paired['p_value']:.4g}); macro F1 {paired['macro_f1_diff']:+.4f} "
                      f"(95% CI {low:+.4f} to {high:+.4f}); broken first: {', '.join(paired['broken_ids'][:5]) or '-'}"]
    if r.get("flips"):
        lines += [f"flipped images: {', '.join(r['flips'])}"]
    return lines


FLIPS_SHOWN = 24  # images in flips.png; flips.csv lists them all


def _write_flips(layout: Layout, test, classes: list[str], scored: dict) -> list:
    """models/gate/: flips.csv (every test image one model gets right and the other wrong: sample, flip,
    label, production's and the challenger's answer) and flips.png (the first FLIPS_SHOWN, broken first);
    with nothing compared (no production, or one that cannot be compared) a header-only flips.csv, so no
    picture of an earlier decision is left to be taken for this one."""
    import csv

    from ..files import atomic_dir

    names = {"flips.csv", "flips.png"}
    with atomic_dir(layout.gate, lambda found: found <= names, "only " + " and ".join(sorted(names))) as tmp:
        with open(tmp / "flips.csv", "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(["sample", "flip", "label", "production", "challenger"])
            if "paired" in scored:
                labels, ids = test.labels.numpy(), test.sample_ids()
                new, old = scored["challenger"].predictions, scored["production"].predictions
                for i in map(int, ((old == labels) != (new == labels)).nonzero()[0]):
                    out.writerow([ids[i], "broken" if old[i] == labels[i] else "fixed", classes[labels[i]],
                                  classes[old[i]], classes[new[i]]])
        if "paired" in scored:
            from ..evaluation import plots

            plots.save(plots.flips(test.images.numpy(), labels, new, old, classes, ids,
                                   f"v{scored['production_version']}", FLIPS_SHOWN), tmp / "flips.png")
    return sorted(p for p in layout.gate.iterdir() if p.name in names)


def _paired_tags(paired, production: str) -> dict[str, str]:
    """The image-by-image comparison on the challenger's version, beside gate.reason."""
    low, high = paired.macro_f1_ci
    return {"gate.p_value": f"{paired.p_value:.4g}",
            "gate.flips": f"{paired.fixed} fixed, {paired.broken} broken of {paired.n} test images vs v{production}",
            "gate.macro_f1_diff": f"{paired.macro_f1_diff:+.4f} (95% CI {low:+.4f} to {high:+.4f})"}


MAX_REASON = 1000  # characters of a promote reason: it goes into a registry tag (MLflow holds 5,000) with the rest


def promote_stage(cfg: Config, version: Optional[str] = None, rollback: bool = False, reason: str = "",
                  force: bool = False) -> dict:
    """Move production by hand (register.shadow's traffic check applies, unless `force`), or roll it back (it
    never does: a rollback goes back to a version that served)."""
    from ..registry import versions as registry
    from ..tracking.store import connect

    start = time.perf_counter()
    if len(reason) > MAX_REASON:  # checked before anything moves: the history entry must hold it
        raise ConfigError(f"--reason: at most {MAX_REASON} characters, got {len(reason)}")
    client, _ = connect(cfg.tracking)
    name = cfg.model_name
    if rollback:
        reason = reason or "manual rollback"
        old, new = registry.rollback(client, name, reason)
        record = {"model": name, "from": old, "production": new, "action": "rollback"}
    elif version is None:
        raise ValueError("promote: give --version N or --rollback")
    else:
        reason = reason or "manual promotion"
        traffic = _traffic(cfg, client, str(version), registry.alias_version(client, name, registry.PRODUCTION))
        if traffic is not None and not traffic.passed:
            if not force:
                raise registry.RegistryError(f"promote: v{version} is not promoted: {traffic.value}; "
                                             f"{traffic.name} needs {traffic.limit} (serve it with `imgclf serve "
                                             "--shadow challenger` until then, or --force to promote regardless)")
            reason = f"{reason} (forced past the shadow check: {traffic.text()})"
        previous, moved = registry.move_production(client, name, version, reason, action="manual")
        record = {"model": name, "from": previous, "production": str(version),
                  "action": "promote" if moved else "none (already production)"}
    run_id = client.get_model_version(name, record["production"]).run_id
    return {**record, "reason": reason, "run_id": run_id, "seconds": round(time.perf_counter() - start, 3)}
