"""The model card, in the Hugging Face format: YAML metadata with a `model-index` of results, then the
sections a reviewer reads before trusting a model. Built from the evaluate stage's own records only."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import yaml

WEAK_DROP = 0.05  # a behavioural test costing more than this is named under the limits
SHORT_LIMIT = 4900  # a registry description is at most 5000 characters (MLflow's column)


def _pct(v: float) -> str:
    return f"{v:.2%}"


def _metadata(name: str, source: str, classes: list[str], metrics: dict, calibration: dict) -> dict[str, Any]:
    results = [{"type": "accuracy", "value": round(metrics["accuracy"], 6), "name": "Test accuracy"},
               {"type": "f1", "value": round(metrics["macro_f1"], 6), "name": "Test macro F1", "args": {"average": "macro"}},
               {"type": "ece", "value": round(calibration["ece"], 6), "name": "Expected calibration error (as served)"}]
    return {"library_name": "pytorch", "pipeline_tag": "image-classification", "license": "other",
            "tags": ["image-classification", "imgclf", source], "datasets": [source],
            "metrics": ["accuracy", "f1", "ece"],
            "model-index": [{"name": name, "results": [{
                "task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"type": source, "name": source, "split": "test"}, "metrics": results}]}]}


def _checks(checks: list[dict]) -> list[str]:
    lines = ["| check | severity | result | detail |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['name']} | {c['severity']} | {c['status']} | {c.get('detail') or '-'} |")
    return lines


def _robustness(rows: list[dict]) -> list[str]:
    lines = ["| test | accuracy | drop | agreement with clean | limit | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        limit = "-" if r["max_drop"] is None else f"drop <= {_pct(r['max_drop'])}"
        result = "-" if r["test"] == "clean" or r["max_drop"] is None else ("pass" if r["passed"] else "FAIL")
        lines.append(f"| {r['test']} | {_pct(r['accuracy'])} | {r['drop']:+.2%} | {_pct(r['agreement'])} | {limit} | {result} |")
    return lines


def md(text: str) -> str:
    """Text (a class name: a folder's name, anyone's to choose) shown as itself in markdown and in the HTML a
    renderer makes of it: no tag, no link, no table cell break, no emphasis."""
    import html

    text = html.escape(str(text), quote=False)
    for ch in "\\`*_[]()#|!~":
        text = text.replace(ch, "\\" + ch)
    return text


def _audit(audit: Optional[dict]) -> str:
    if audit is None:
        return "- Audit (`imgclf audit`): not run on this prepared data."
    return (f"- Audit (`imgclf audit` of this prepared data): suspected label errors {audit['train_val']:.2%} of train "
            f"+ validation, {audit['test']:.2%} of test; {audit['groups']} near-duplicate groups, "
            f"{audit['across_splits']} across splits.")


def _reuse(test_reuse: Optional[dict], limit: Optional[int]) -> list[str]:
    if test_reuse is None:
        return []
    decisions, promotions = test_reuse["decisions"], test_reuse["promotions"]
    line = (f"- This test split (sha256 `{test_reuse['split'][:12]}`) has decided {decisions} gate decision(s) before this model "
            f"({promotions} promoted); register.max_test_reuse {limit if limit is not None else 'off'}.")
    if limit is not None and decisions >= limit:
        line += " **Past it: the scores above come from a split that choices have been fitted to.**"
    return [line]


def model_card(*, name: str, cfg, meta: dict, data_version: str, run_id: str, run_link: str, train: dict,
               metrics: dict, per_class, robustness: list[dict], calibration: dict,
               test_reuse: Optional[dict] = None, audit: Optional[dict] = None) -> str:
    """The card as markdown; `per_class` is evaluate's per-class DataFrame; `test_reuse`: the gate decisions
    and promotions taken on this test split (`split`, its sha256) before this model (None: not counted)."""
    classes, source = meta["classes"], meta["source"]
    c, h, w = meta["image_shape"]
    head = yaml.safe_dump(_metadata(name, source, classes, metrics, calibration), sort_keys=False)
    t = cfg.train
    arch = {k: v for k, v in dataclasses.asdict(cfg.model.active).items() if k != "train"}
    sizes = ", ".join(f"{k} {meta['sizes'][k]}" for k in ("train", "val", "test"))
    run = f"[{run_id}]({run_link})" if run_link.startswith("http") else run_id + (f" ({run_link})" if run_link else "")
    body = [
        f"# {name}: {cfg.model.kind} on {source}", "",
        f"A {cfg.model.kind} image classifier for {len(classes)} classes ({', '.join(map(md, classes[:12]))}"
        f"{', ...' if len(classes) > 12 else ''}), input {c}x{h}x{w}, trained by the imgclf pipeline: "
        f"MLflow run {run}.", "",
        "## Data", "",
        f"- Source: `{source}`; data version (DVC): `{data_version}`; raw data sha256 `{meta['raw_sha256'][:16]}`.",
        f"- Splits: {sizes} (validation {cfg.data.val_fraction:.0%} "
        f"of train, stratified, seed {cfg.data.seed}); normalization {meta['normalization']['kind']}.",
        "- Checks at prepare:", "", *_checks(meta.get("checks", [])), "",
        _audit(audit), "",
        "## Training", "",
        f"- Model: `{cfg.model.kind}`, " + ", ".join(f"{k} {v}" for k, v in arch.items()) + ".",
        f"- Optimizer {t.optimizer}, lr {t.lr:g}, weight decay {t.weight_decay:g}, schedule {t.schedule}, batch {t.batch_size}, "
        f"label smoothing {t.label_smoothing:g}, augmentation shift {t.augment_shift} px, mirroring {t.augment_flip}.",
        f"- {train.get('epochs_run', '?')} of {t.max_epochs} epoch{'' if t.max_epochs == 1 else 's'} (patience "
        f"{t.patience}); weights of epoch {train.get('kept_epoch', '?')} kept "
        f"({train.get('kept_because') or 'train.keep=' + t.keep}); their validation accuracy "
        f"{_pct(train.get('kept_val_acc', 0))}.", "",
        "## Metrics (test split)", "",
        f"- Accuracy **{_pct(metrics['accuracy'])}**, macro F1 {metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f}, "
        f"{metrics['n']} images.",
        *_reuse(test_reuse, cfg.register.max_test_reuse), "",
        "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
        *[f"| {md(r['class'])} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
          for r in per_class.to_dict("records")], "",
        "## Robustness (behavioural tests on the test split)", "", *_robustness(robustness), "",
        "## Calibration", "",
        f"- Expected calibration error ({calibration['bins']} bins): {calibration['ece_before']:.4f} from the raw "
        f"softmax, **{calibration['ece']:.4f}** as served, with temperature {calibration['temperature']:.4f} fitted on "
        "the validation split (`predict` and the served model divide the logits by it).",
        f"- Test NLL {calibration['nll_before']:.4f} before scaling, {calibration['nll']:.4f} after.", "",
        "## Intended use and limits", "",
        f"- For images like the {source} data: {c} channel(s), resized to {h}x{w}, the same polarity and framing. "
        "Other inputs get a confident-looking answer all the same; the behavioural table shows how far "
        "the model holds under small changes.",
        f"- `imgclf predict` flags an answer whose top probability is under {cfg.evaluate.low_confidence:g} "
        "(evaluate.low_confidence): check those by hand.",
        "- The metrics come from one test split of this data set; they say nothing about other sources.",
    ]
    weak = [f"{r['test']} ({r['accuracy']:.2%})" for r in robustness[1:] if r["drop"] > WEAK_DROP]
    if weak:
        body.append(f"- Known weaknesses: accuracy falls by more than {WEAK_DROP:.0%} under {', '.join(weak)}.")
    return f"---\n{head}---\n\n" + "\n".join(body) + "\n"


def short_description(card: str, link: str) -> str:
    """The card as a registry version's description, which MLflow's version page renders as plain markdown: it
    has no front matter, so the card's YAML header (its `---` lines became a heading, its keys bullets) goes
    last as a fenced yaml block, after the body. All of it when it fits the description's limit; else the body
    is cut at a section and a link to the full card follows."""
    head, body = "", card
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        head, body = card[4:].split("\n---\n", 1)
        head, body = head.strip("\n"), body.lstrip("\n")
    tail = f"\n## Card metadata\n\n```yaml\n{head}\n```\n" if head else ""
    body = body.rstrip("\n") + "\n"
    if len(body) + len(tail) > SHORT_LIMIT:
        cut = body[: max(SHORT_LIMIT - len(tail) - 200, 0)].rsplit("\n## ", 1)[0]
        body = f"{cut}\n\n(The full model card is the run's artifact {link}.)\n"
    return body + tail
