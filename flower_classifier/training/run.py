"""One training run: train(config, device) runs it and returns its figures.

    from flower_classifier.training.config import TrainConfig
    from flower_classifier.training.run import train
    result = train(TrainConfig("flowers", save_dir="run"), torch.device("cpu"))
    result["checkpoint"], result["valid_accuracy"], result["test_accuracy"]

One run: find the splits, build the backbone and a new head, make the Task (training/tasks),
train epoch by epoch keeping the best weights (training/loop.py), calibrate on valid/, write the
checkpoint, then test and report. train.py is its command line.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flower_classifier.data.class_names import (
    check_class_names,
    display_names,
    load_category_names,
)
from flower_classifier.data.corrections import (
    apply_corrections,
    corrections_line,
    load_corrections,
)
from flower_classifier.data.split import (
    MANIFEST_NAME,
    SPLIT_NAMES,
    Dataset,
    load_dataset,
    manifest_record,
)
from flower_classifier.datacheck.report import check_dataset, summary_lines
from flower_classifier.models.backbones import (
    DEFAULT_ARCH,
    DEFAULT_TRAIN_STAGES,
    Backbone,
    build_backbone,
)
from flower_classifier.models.calibration import (
    DEFAULT_PASS_RATE,
    class_means,
    fit_temperature,
    nearest_similarity,
    pass_threshold,
)
from flower_classifier.models.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_preprocess,
    save_checkpoint,
)
from flower_classifier.models.classifier import ImageClassifier, build_head
from flower_classifier.models.explain import heatmap_drawer
from flower_classifier.models.features import extraction_summary
from flower_classifier.reports.evaluation import evaluation_lines, write_evaluation
from flower_classifier.reports.plots import plot_training_curves
from flower_classifier.reports.test_report import calibration_section
from flower_classifier.training.config import TrainConfig
from flower_classifier.training.loop import (
    CURVES_NAME,
    Trainer,
    evaluate,
    head_spec,
    prepare_save_dir,
)
from flower_classifier.training.tasks import make_task
from flower_classifier.utils import distributed
from flower_classifier.utils.console import log, warn
from flower_classifier.utils.errors import UserError


@dataclass
class Setup:
    """What a run trains: its config with the family defaults filled in, the classifier (a new
    head on the backbone) and the data."""
    config: TrainConfig
    classifier: ImageClassifier
    dataset: Dataset

    @property
    def backbone(self) -> Backbone:
        return self.classifier.backbone_spec

    @property
    def split_record(self):
        """What the checkpoint records of an automatic split (None for a layout)."""
        return manifest_record(self.dataset.manifest) if self.dataset.manifest else None


def load_backbone(arch):
    """build_backbone, naming the offline alternative when a download fails."""
    try:
        return build_backbone(arch)
    except UserError as error:
        if arch == DEFAULT_ARCH:
            raise
        raise UserError(f"{error}; or use --arch {DEFAULT_ARCH}, which is bundled and works "
                        "offline") from None


def class_names_given(data_dir, category_names, class_to_idx):
    """{class folder name: display name} of the classes a category names file names
    (category_names, else data_dir/cat_to_name.json when present; {} without one): kept in
    the checkpoint and shown in the reports and the data check's contact sheets. Two classes
    shown alike, or an empty name, is a UserError."""
    path = category_names or Path(data_dir) / "cat_to_name.json"
    names = load_category_names(path) if category_names or Path(path).is_file() else {}
    check_class_names(list(class_to_idx), display_names(class_to_idx, names), path)
    return {folder: names[folder] for folder in class_to_idx if folder in names}


def load_run_dataset(config, save_dir):
    """The run's Dataset: a train/valid/test layout as it is; a folder of class folders split
    automatically (the manifest kept in save_dir, where an earlier one keeps its photos where
    they were), or as config.split_from records; then config.corrections applied (the
    manifest keeps every photo's placement)."""
    manifest_path = Path(save_dir) / MANIFEST_NAME
    dataset = load_dataset(config.data_dir, dict(zip(SPLIT_NAMES, config.split)),
                           config.split_from, manifest_path)
    if dataset.manifest is not None:
        log(f"{config.data_dir} split automatically ({', '.join(dataset.splits)}); the split is "
            f"kept in {manifest_path}" if not config.split_from
            else f"split as {config.split_from} records")
    if config.corrections:
        counts = {}
        dataset = apply_corrections(dataset, load_corrections(config.corrections), counts)
        log(corrections_line(config.corrections, counts))
    return dataset


def build_classifier(config, resumed, save_dir):
    """The run's Setup: its data, and a new head on the backbone."""
    dataset = load_run_dataset(config, save_dir)
    class_to_idx = dataset.class_to_idx
    if resumed and resumed["class_to_idx"] != class_to_idx:
        raise UserError(f"the classes of {config.data_dir} differ from those of the run being "
                        "resumed; resume on the same data, or train anew without --resume")
    log(f"{len(class_to_idx)} classes; " + ", ".join(
        f"{name} {len(split.paths)} images" for name, split in dataset.splits.items()))
    torch.manual_seed(config.seed)  # before the backbone: one trained from scratch starts random
    backbone = load_backbone(config.arch)
    if resumed and backbone.pretrained:
        # Preprocessed as the run began (bilinear for one begun before the filter was recorded).
        backbone.preprocess = checkpoint_preprocess(resumed)
    config = config.resolved(from_scratch=not backbone.pretrained,
                             default_stages=DEFAULT_TRAIN_STAGES.get(backbone.name, 0))
    classifier = ImageClassifier(backbone, build_head(backbone.feature_dim, len(class_to_idx),
                                                      **head_spec(config)))
    return Setup(config, classifier, dataset)


def run_data_check(config, dataset, task, save_dir, class_names=None):
    """The data check on the features training computed anyway (nothing to do where the
    backbone trains); its summary in the log, the full report in save_dir."""
    if not config.data_check or task.split_features is None or not distributed.is_main():
        return
    report = check_dataset(dataset.class_to_idx, dataset.splits, task.split_features, save_dir,
                           config.cache_dir, class_names=class_names)
    log("\n".join(summary_lines(report, save_dir)))


def calibrate(config, classifier, task, best, device):
    """What keeps predictions honest, from the best epoch: the temperature fitted on valid/
    and, on cached features, the class means and the similarity threshold of the unknown
    verdict (DEFAULT_PASS_RATE of valid/ passes). Checkpoint keys: see models/checkpoint.py."""
    classifier.load_trained_weights(best)
    valid = evaluate(task.model, task.eval_batches("valid"), nn.CrossEntropyLoss(), device)
    train = task.frozen_features("train")
    calibration = {"mirror": config.mirror != "off" and train is not None,  # as valid/, test/
                   "temperature": fit_temperature(valid["logits"], valid["labels"])}
    if train is not None:
        means = class_means(*train, classifier.head[-1].out_features)
        calibration["class_means"] = means.half()
        calibration["unknown_threshold"] = pass_threshold(
            nearest_similarity(task.frozen_features("valid")[0], means), DEFAULT_PASS_RATE)
    log(f"temperature {calibration['temperature']:.3f}" + (
        f"; unknown below similarity {calibration['unknown_threshold']:.3f} to the nearest "
        f"class mean ({DEFAULT_PASS_RATE:.0%} of valid/ passes)"
        if "class_means" in calibration else ""))
    return calibration


def unknown_share(task, calibration):
    """The share of test images the unknown verdict flags, or None without a verdict."""
    if "class_means" not in calibration:
        return None
    similarity = nearest_similarity(task.frozen_features("test")[0], calibration["class_means"])
    return (similarity < calibration["unknown_threshold"]).float().mean().item()


def test_and_report(classifier, task, best, names, save_dir, device, calibration):
    """Test accuracy of the best epoch; on rank 0 the report, the confusion matrix and the
    wrongly named test photos, with where the model looked (reports/evaluation.py) in
    save_dir."""
    classifier.load_trained_weights(best)
    test = evaluate(task.model, task.eval_batches("test"), nn.CrossEntropyLoss(), device)
    if not len(test["labels"]):
        warn("no readable images in test/: no test accuracy or report")
        return None
    if distributed.is_main():
        paths = task.eval_paths("test")
        if paths is not None and len(paths) != len(test["labels"]):
            paths = None  # fine-tuning skipped unreadable images: the order is not known
        temperature = calibration["temperature"]
        evaluation = write_evaluation(
            save_dir, test["labels"], (test["logits"] / temperature).softmax(1), names, paths,
            calibration_section(test["logits"], test["labels"], temperature,
                                unknown_share(task, calibration)),
            heatmap=heatmap_drawer(classifier, names))
        log("\n".join(evaluation_lines(evaluation, save_dir)))
    return test["accuracy"]


def train(config, device, resumed=None):
    """One training run; resumed: a train state (models.checkpoint.load_train_state) to
    continue, whose hyperparameters config already holds. Returns the run's figures."""
    started = time.perf_counter()
    save_dir = prepare_save_dir(config.save_dir)
    log(f"this run's files go to {save_dir}/")
    setup = build_classifier(config, resumed, save_dir)
    config, classifier, dataset = setup.config, setup.classifier, setup.dataset
    class_names = class_names_given(config.data_dir, config.category_names,
                                    dataset.class_to_idx)
    names = display_names(dataset.class_to_idx, class_names)
    task = make_task(config, classifier, dataset.splits, device)
    if setup.backbone.pretrained and not config.finetune:
        log(f"features ready: {extraction_summary(task.extracted, task.requested)} "
            f"({time.perf_counter() - started:.1f} s)")
    run_data_check(config, dataset, task, save_dir, class_names)
    trainer = Trainer(config, classifier, task, device, dataset.class_to_idx,
                      setup.split_record, class_names)
    if resumed:
        trainer.resume(resumed)
    best, history = trainer.fit()
    calibration = calibrate(config, classifier, task, best, device)
    checkpoint_path = save_dir / CHECKPOINT_NAME
    if distributed.is_main():
        save_checkpoint(trainer.checkpoint(best, calibration), checkpoint_path)
        plot_training_curves(history, save_dir / CURVES_NAME)
        log(f"best epoch {best['epoch']}: valid accuracy "
            f"{best['metrics']['valid_accuracy']:.2%}; saved {checkpoint_path} "
            f"({checkpoint_path.stat().st_size / 1e6:.1f} MB) and {CURVES_NAME}")
    test_accuracy = None
    if "test" in dataset.splits:
        test_accuracy = test_and_report(classifier, task, best, names, save_dir, device,
                                        calibration)
    log(f"done in {time.perf_counter() - started:.1f} s; the checkpoint, curves and reports are "
        f"in {save_dir}/")
    return {"checkpoint": checkpoint_path, "best_epoch": best["epoch"],
            "valid_accuracy": best["metrics"]["valid_accuracy"], "test_accuracy": test_accuracy,
            "extracted_images": task.extracted, "history": history}
