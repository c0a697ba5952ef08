"""Notifications: a webhook (Prefect's CustomWebhookNotificationBlock, saved as `imgclf-notify`) and three
automations that send to it, on the server at PREFECT_API_URL:

- "imgclf: flow run failed": any flow run of this project's flows ends Failed or Crashed;
- "imgclf: model promoted": register moved `production` (imgclf.model.promoted);
- "imgclf: drift detected": a batch-inference run found drift (imgclf.drift.detected).

    uv run python -m flows.notify --webhook URL   # create or replace (the receiver gets JSON {subject, body})
    uv run python -m flows.notify --off           # pause the three; --on resumes them; --delete removes them
"""

from __future__ import annotations

import argparse

from prefect.automations import Automation, EventTrigger, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock

from tasks import events

BLOCK = "imgclf-notify"
FLOWS = ("training-pipeline", "train", "hyperparameter-sweep", "compare-models", "batch-inference", "data-refresh")
RULES = {
    "imgclf: flow run failed": (
        {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, {"prefect.resource.id": "prefect.flow-run.*"},
        {"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)},
        "imgclf: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}",
        "Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
        "{{ flow_run.state.message }}"),
    "imgclf: model promoted": (
        {events.MODEL_PROMOTED}, {}, None,
        "imgclf: {{ event.payload.model }} v{{ event.payload.version }} is production",
        "{{ event.payload.model }} v{{ event.payload.version }} promoted: {{ event.payload.reason }} "
        "(run {{ event.payload.run_id }})"),
    "imgclf: drift detected": (
        {events.DRIFT_DETECTED}, {}, None,
        "imgclf: drift in batch {{ event.resource.id }}",
        "{{ event.payload.images }} images scored by {{ event.payload.model_uri }}: {{ event.payload.reason }} "
        "(report: {{ event.payload.report }})"),
}


def webhook_block(webhook: str) -> CustomWebhookNotificationBlock:
    """The block for `webhook` (http or https only), its credentials in the block's secret field: the user info
    becomes a Basic Authorization header and the query string (where hook tokens live) a secret the URL names,
    so neither reads back from the API or the UI."""
    import urllib.parse

    from imgclf.urls import redact, without_credentials

    if urllib.parse.urlsplit(webhook).scheme not in ("http", "https"):
        raise SystemExit(f"error: --webhook {redact(webhook)!r}: an http(s) URL is needed")
    base, auth = without_credentials(webhook)
    base, _, query = base.partition("?")
    secrets = {**({"authorization": auth["Authorization"]} if auth else {}), **({"query": query} if query else {})}
    return CustomWebhookNotificationBlock(
        name=BLOCK, url=base + ("?{{query}}" if query else ""), method="POST", secrets=secrets,
        headers={"Authorization": "{{authorization}}"} if auth else None,
        json_data={"subject": "{{subject}}", "body": "{{body}}"})


def install(webhook: str) -> list[str]:
    block_id = webhook_block(webhook).save(BLOCK, overwrite=True)
    remove()
    made = []
    for name, (expect, match, related, subject, body) in RULES.items():
        trigger = EventTrigger(expect=expect, match=match, match_related=related or {}, posture="Reactive",
                               threshold=1, within=0)
        automation = Automation(name=name, trigger=trigger, actions=[
            SendNotification(block_document_id=block_id, subject=subject, body=body)]).create()
        made.append(f"{name} ({automation.id})")
    return made


def _ours() -> list:
    """Every automation with one of our names (creating twice makes two of a name; all of them count)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [a for name in RULES for a in client.read_automations_by_name(name=name)]


def remove() -> int:
    from prefect.client.orchestration import get_client

    found = _ours()
    with get_client(sync_client=True) as client:
        for a in found:
            client.delete_automation(a.id)
    return len(found)


def switch(on: bool) -> int:
    found = _ours()
    for a in found:
        Automation(**a.model_dump()).enable() if on else Automation(**a.model_dump()).disable()
    return len(found)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--webhook", metavar="URL", help="where notifications are POSTed")
    g.add_argument("--on", action="store_true")
    g.add_argument("--off", action="store_true")
    g.add_argument("--delete", action="store_true")
    args = p.parse_args()
    if args.webhook:
        for line in install(args.webhook):
            print(f"automation {line}")
    elif args.delete:
        print(f"{remove()} automations deleted")
    else:
        print(f"{switch(args.on)} automations {'resumed' if args.on else 'paused'}")


if __name__ == "__main__":
    main()
