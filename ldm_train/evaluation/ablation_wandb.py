"""The ablation's wandb summary run, in the sweep's group: the tables as `wandb.Table`s, the stage-2 quality
curves as native wandb line plots, the report's figures and the final sample grid as images."""

from __future__ import annotations

from pathlib import Path

from ldm_train.evaluation.ablation import AUTOENCODER, GENERATION, lead, quality_curves, table
from ldm_train.evaluation.metric_info import metric_info
from ldm_train.evaluation.sweep import read_sweep


def log_to_wandb(sweep: Path, rows: list[dict], figures: dict[str, Path], logger: dict) -> None:
    """One run (job_type=ablation) named after the sweep folder; the same metric keys as the jobs' runs."""
    import wandb

    from ldm_train.lit.trainer import wandb_mode

    sweep = Path(sweep)
    group = logger.get("group") or read_sweep(sweep).get("group") or sweep.name
    run = wandb.init(project=logger.get("project", "ldm_train"), group=group, job_type="ablation",
                     name=f"ablation-{sweep.name}", dir=str(sweep), mode=wandb_mode(logger.get("mode", "auto")),
                     reinit="finish_previous", config={"jobs": [r["job"] for r in rows],
                                                       "rows": [r["label"] for r in rows]})
    first, firsts = lead(rows)  # the row label and what it trained (f, backbone, objective, ...)
    data = {"ablation/table/jobs": wandb.Table(columns=[*first, "status", "reason", "job"],
                                               data=[[*c, r["status"], r["reason"], r["job"]]
                                                     for c, r in zip(firsts, rows)])}
    for name, columns in (("autoencoder", AUTOENCODER), ("generation", GENERATION)):
        header, cells, _ = table(rows, columns)
        data[f"ablation/table/{name}"] = wandb.Table(columns=header, data=cells)
    for metric, by_label in quality_curves(rows).items():
        labels = list(by_label)
        points = [sorted(by_label[k]) for k in labels]
        data[f"ablation/curve/{metric}"] = wandb.plot.line_series(
            xs=[[p[0] for p in pts] for pts in points], ys=[[p[1] for p in pts] for pts in points], keys=labels,
            title=f"{metric_info(metric).label()} against the stage-2 step", xname="stage-2 step")
    for name, path in figures.items():
        data[f"ablation/figure/{name}"] = wandb.Image(str(path), caption=path.name)
    run.log(data)
    run.finish()
