"""The `imgclf` command: one subcommand per stage, each taking --params and --set overrides.

Each command is a few lines around its stage function (wrapper.py loads the config, turns errors into
one line and prints the result); the service commands (ui, prefect-server, stack, worker, wait, stop) are in services.py.
The whole pipeline under Prefect starts from the orchestration layer: `python -m flows`.
"""

from __future__ import annotations

import click

from ..config import Config
from ..console import progress_bar
from .services import prefect_server, serve, stack, stop, ui, wait, worker
from .wrapper import EXIT_CODE, EXIT_DRIFT, stage_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """imgclf: download, prepare, train, evaluate and register image classifiers."""


_wait = click.option("--wait", is_flag=True, help="Wait while another process writes this stage's outputs "
                                                 "(default: fail at once, naming it).")


@main.command()
@click.option("--mirror", "mirrors", multiple=True, metavar="URL|DIR",
              help="Mirror for the data set (http(s) URL or local folder), replaces runtime.download.mirrors; "
                   "also $IMGCLF_MIRROR. Repeatable.")
@_wait
@stage_command
def download(cfg: Config, mirrors: tuple[str, ...], wait: bool) -> dict:
    """Fetch an MNIST-family data set (mirrors, retries, checksums) or snapshot an ImageFolder into data/raw."""
    from ..stages.download import download_stage

    return download_stage(cfg, list(mirrors), progress=progress_bar("download", "B", True), wait=wait)


@main.command()
@_wait
@stage_command
def prepare(cfg: Config, wait: bool) -> dict:
    """Decode, split (stratified, seeded) and store normalization stats in data/processed."""
    from ..stages.prepare import prepare_stage

    return prepare_stage(cfg, progress=progress_bar("prepare"), wait=wait)


@main.command()
@click.option("--resume", is_flag=True, help="Continue from models/checkpoint.pt (same model, data and params).")
@_wait
@stage_command
def train(cfg: Config, resume: bool, wait: bool) -> dict:
    """Train the MLP or CNN with validation, early stopping and per-epoch checkpoints."""
    import time

    from ..stages.train import train_stage

    timeout = cfg.runtime.orchestration.train_timeout_s
    return train_stage(cfg, resume=resume, on_batch=progress_bar("train"), wait=wait,
                       deadline=time.monotonic() + timeout if timeout else None)


@main.command()
@_wait
@stage_command
def evaluate(cfg: Config, wait: bool) -> dict:
    """Score the best model on the test split: metrics, per-class table, pictures, TorchScript."""
    from ..stages.evaluate import evaluate_stage

    return evaluate_stage(cfg, wait=wait)


@main.command()
@click.option("--explain", is_flag=True, help="Print the last decision in full (models/registered.json): every "
                                              "check, the test split's reuse, the flipped images; registers nothing.")
@_wait
@stage_command
def register(cfg: Config, explain: bool, wait: bool) -> dict | list[str]:
    """Register the evaluated model (alias challenger) and run the promotion gate."""
    from ..stages.register import explain as explained
    from ..stages.register import register_stage

    return explained(cfg) if explain else register_stage(cfg, wait=wait)


@main.command()
@click.option("--accept", type=click.IntRange(1), default=None, metavar="N",
              help="Turn the first N rows of the last audit's label_issues.csv into corrections (relabel to the "
                   "suggested class) in data.corrections; audits nothing.")
@_wait
@stage_command
def audit(cfg: Config, accept: int | None, wait: bool) -> dict:
    """Suspected label errors (cross-validated, ranked by confident learning) and near-duplicate images of the
    prepared splits, as tables and pictures in paths.audit_dir."""
    from ..stages.audit import accept as accepted
    from ..stages.audit import audit_stage

    return accepted(cfg, accept) if accept else audit_stage(cfg, wait=wait)


@main.command()
@_wait
@stage_command
def sync(cfg: Config, wait: bool) -> dict:
    """Send metrics journaled during a tracking outage and close the runs they belong to."""
    from ..stages.sync import sync_stage

    return sync_stage(cfg, wait=wait)


@main.command()
@click.option("--trials", type=click.IntRange(1), default=None,
              help="Finished trials the study ends with (default sweep.trials); a rerun adds only the missing ones.")
@click.option("--parallel", type=click.IntRange(1), default=None,
              help="Trials at once (default sweep.parallel), each on an equal share of the cores.")
@stage_command
def sweep(cfg: Config, trials: int | None, parallel: int | None, source: tuple[dict, dict]) -> dict:
    """Search sweep.space with Optuna: trials pruned per epoch, MLflow parent and child runs, the best through
    evaluate and the promotion gate. Killed, the same command goes on with the study."""
    import logging

    from ..sweep.stage import sweep_stage

    raw, overrides = source
    record = sweep_stage(cfg, raw, overrides, trials=trials, parallel=parallel)
    logging.getLogger("imgclf").info("sweep %s:\n%s", record["study"], record.pop("top_trials"))
    record.pop("trials")
    return record


@main.command()
@click.option("--version", "version", default=None, help="Version to move the production alias to.")
@click.option("--rollback", is_flag=True, help="Move production back to the version that held it before.")
@click.option("--reason", default="", help="Why; recorded on the version.")
@click.option("--force", is_flag=True, help="Promote even though register.shadow's traffic has not vouched for the "
                                           "version (recorded in the reason).")
@stage_command
def promote(cfg: Config, version: str | None, rollback: bool, reason: str, force: bool) -> dict:
    """Move the `production` alias by hand, or roll it back; a Prefect server at PREFECT_API_URL is told (its
    "model promoted" automation notifies, as for the gate's moves)."""
    import logging

    from ..ops.prefect_events import model_promoted
    from ..stages.register import promote_stage

    if bool(version) == rollback:
        raise click.UsageError("give exactly one of --version N or --rollback")
    record = promote_stage(cfg, version, rollback, reason, force)
    said = model_promoted(record)
    if said:
        logging.getLogger("imgclf").log(logging.WARNING if said.startswith("warning") else logging.INFO, said)
        record["notification"] = said
    return record


@main.command("shadow-report")
@click.option("--version", "version", default=None, help="The shadowed version (default: the challenger).")
@click.option("--out", default=None, help="The figure's path (default: <paths.reports_dir>/shadow-<model>-v<N>.png).")
@stage_command
def shadow_report(cfg: Config, version: str | None, out: str | None) -> dict:
    """What `imgclf serve --shadow` recorded of a version: agreement with production overall and per class,
    both latencies, whether register.shadow is met, and a figure of the images where the two disagreed."""
    from ..serve.shadow_report import shadow_report_stage

    return shadow_report_stage(cfg, version, out)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model-uri", default=None, help="Default: models:/<register.model_name>@production.")
@stage_command
def predict(cfg: Config, images: tuple[str, ...], model_uri: str | None) -> list[str]:
    """Classify image files with a registered model: file, class, calibrated probability, the model version and
    `low-confidence` when the probability is under evaluate.low_confidence, one line per file."""
    from ..stages.predict import predict_stage

    return [f"{r['file']}\t{r['class']}\t{r['probability']:.4f}\t{r['model']}" + ("\tlow-confidence" * r["low_confidence"])
            for r in predict_stage(cfg, list(images), model_uri)]


@main.command("predict-batch")
@click.argument("inputs", type=click.Path(exists=True))
@click.option("--model-uri", default=None, help="Default: monitor.model_uri, else models:/<register.model_name>@production.")
@click.option("--out", default=None, help="The batch's folder (default: monitor.out_dir/<UTC time>-<name>); must not exist.")
@click.option("--fail-on-drift", is_flag=True, help=f"Exit {EXIT_DRIFT} (after writing everything) when the batch drifted.")
@stage_command
def predict_batch(cfg: Config, inputs: str, model_uri: str | None, out: str | None, fail_on_drift: bool) -> dict:
    """Score a folder of images (any depth) or an IDX images file in batches, check it for drift against the
    model's training data, write predictions.csv and the drift report, and log an MLflow inference run."""
    from ..stages.predict_batch import predict_batch_stage

    summary = predict_batch_stage(cfg, inputs, model_uri, out, progress=progress_bar("predict-batch"))
    summary.pop("files")
    if fail_on_drift and (summary.get("drift") or {}).get("drifted"):
        summary[EXIT_CODE] = EXIT_DRIFT  # the summary is printed first: a script still gets it
    return summary


for _command in (ui, prefect_server, serve, stack, worker, wait, stop):
    main.add_command(_command)
