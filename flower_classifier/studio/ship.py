"""The studio's "Ship": the latest run's head as the checkpoint train.py writes for a head-alone
model, exported by export.py's library with the classes and their names inside.

    shipper = Shipper(trainer)
    path = shipper.model_file(2, "onnx")   # save_dir/runs/2/onnx/photos-run-2.onnx

Only the latest classifier is kept in memory, so only the latest run can be exported; each
export is kept (per run and format) and a second download sends the same file.
"""
import logging
import re
import threading
from pathlib import Path

from flower_classifier.data.split import manifest_record
from flower_classifier.export.formats import EXPORTERS, FORMATS, require
from flower_classifier.export.run import ExportRequest, export_checkpoint
from flower_classifier.models.checkpoint import (
    CHECKPOINT_NAME,
    make_checkpoint,
    save_checkpoint,
)
from flower_classifier.serve.answers import BadRequest
from flower_classifier.training.loop import head_spec
from flower_classifier.utils.errors import UserError

# save_dir/runs/<run id>/: an exported run's checkpoint, and a folder per format holding the
# model file (named as it downloads) and its metadata beside it.
RUNS_FOLDER = "runs"
# The formats a download can be: one file each (Core ML's .mlpackage is a folder).
SHIPPED_FORMATS = ("onnx", "torchscript", "executorch", "tflite")


def best_epoch(run):
    """(epoch, metrics) of the run's best valid accuracy, the first such epoch as fit_head
    keeps it."""
    best = max(run["history"], key=lambda row: (row["valid_accuracy"], -row["epoch"]))
    return best["epoch"], {key: value for key, value in best.items() if key != "epoch"}


def download_name(data_dir, run_id, export_format):
    """The model file's name, as it downloads: the photo folder's name (ASCII letters,
    digits, - _ and . only: it goes in a header), the run and the format's ending."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data_dir).resolve().name).strip("._") or "model"
    return f"{stem}-run-{run_id}{FORMATS[export_format]}"


class Shipper:
    """The model files of the studio's runs, exported on first request; one export at a time
    (a second request for the same file waits for the first, then sends its file)."""

    def __init__(self, trainer):
        self.trainer, self.studio = trainer, trainer.studio
        self.lock, self.exported = threading.Lock(), {}  # {(run id, format): path}

    def model_file(self, run_id, export_format):
        """The model file of run_id in export_format, exported on the first request."""
        if export_format not in SHIPPED_FORMATS:
            raise BadRequest(400, f"There is no {export_format!r} download; ask for format "
                             f"{', '.join(SHIPPED_FORMATS)}.")
        with self.lock:
            path = self.exported.get((run_id, export_format))
            if path is None or not path.is_file():  # not exported yet, or deleted since
                path = self.exported[run_id, export_format] = self.export(run_id, export_format)
            return path

    def export(self, run_id, export_format):
        """Write the run's checkpoint and export it; UserErrors (a missing exporter, a full
        disk) as one sentence, a bug logged and said in one sentence."""
        if export_format in EXPORTERS:
            module, install = EXPORTERS[export_format]
            try:
                require(module, f"The {FORMATS[export_format]} download", install)
            except UserError as error:
                raise BadRequest(501, f"{error}.") from None
        checkpoint = self.save_checkpoint(run_id)
        output = checkpoint.parent / export_format / download_name(
            self.studio.options.data_dir, run_id, export_format)
        try:
            result = export_checkpoint(ExportRequest(
                str(checkpoint), export_format, output=str(output),
                category_names=dict(zip(self.studio.classes, self.studio.names))))
        except UserError as error:
            raise BadRequest(500, f"The model was not exported: {error}.") from None
        except Exception as error:  # a bug: said in one sentence, logged with its traceback
            logging.getLogger("uvicorn.error").exception("export of run %s failed", run_id)
            raise BadRequest(500, f"The export failed ({type(error).__name__}).") from None
        return Path(result["output"])

    def latest_classifier(self, run_id):
        """(classifier, its TrainConfig, run record) of run_id: 409 before any run and unless it
        is the latest run that ended well (the trainer keeps only its classifier), 404 for no
        such run."""
        runs = self.trainer.runs_json()
        if not runs:
            raise BadRequest(409, "No run has ended yet; wait for the first run on the folder "
                             "as filed, or retrain, then download its model.")
        run = next((run for run in runs if run["id"] == run_id), None)
        if run is None:
            raise BadRequest(404, f"There is no run {run_id}; the runs are listed by GET "
                             "/api/runs.")
        if run.get("earlier"):
            raise BadRequest(409, f"Run {run_id} was trained before the studio last started, "
                             "and its model went with that process; retrain to download one.")
        if run["status"] == "running":
            raise BadRequest(409, f"Run {run_id} is still training; download its model once it "
                             "is done.")
        if run["status"] != "done":
            raise BadRequest(409, f"Run {run_id} failed, so it has no model; retrain again.")
        latest = self.trainer.latest  # (run id, classifier, config), stored at once
        if latest is None or latest[0] != run_id:
            which = f" (run {latest[0]} is)" if latest else ""
            raise BadRequest(409, f"Only the latest run's model is kept in memory, and run "
                             f"{run_id} is not the latest to have ended well{which}; download "
                             "that one's model.")
        return latest[1], latest[2], run

    def save_checkpoint(self, run_id):
        """save_dir/runs/<run id>/checkpoint.pth, written as train.py --train_stages 0 writes
        it, without the temperature and unknown verdict the quick retrain does not fit."""
        classifier, config, run = self.latest_classifier(run_id)
        studio = self.studio
        epoch, metrics = best_epoch(run)
        extra = {"split": manifest_record(studio.dataset.manifest)} if studio.dataset.manifest \
            else {}
        checkpoint = make_checkpoint(
            classifier.backbone_spec, studio.dataset.class_to_idx, head_spec(config),
            classifier.trained_weights(), hyperparameters=config.hyperparameters(), epoch=epoch,
            metrics=metrics, class_names=dict(zip(studio.classes, studio.names)), **extra)
        path = studio.save_dir / RUNS_FOLDER / str(run_id) / CHECKPOINT_NAME
        try:
            save_checkpoint(checkpoint, path)
        except UserError as error:
            raise BadRequest(500, f"The model was not saved: {error}.") from None
        return path
