"""Issue 34's labelling loop, simulated: does predict.py --suggest's rule need fewer labels than
labelling photos at random?

    python benchmarks/active_learning.py ../shared/data/flowers102 --plot active_learning.png
    python benchmarks/active_learning.py ../shared/data/flowers102 --learner head   # quick retrain

The known labels of train/ are the oracle. Each seed starts from --start labelled photos per
class, chosen at random; each round trains a model on the labelled photos, scores it on valid/
(mirror-averaged, as predict.py scores), and labels --batch more photos of the rest, chosen by
each rule from that model's probabilities. The model (--learner) is train.py's default, its
last 2 stages trained with the head on the cached activations that enter them (quality.py
train_stage_task), as --suggest scores with a default checkpoint; or the head alone on the
backbone features (quality.py train_heads), as the studio's quick retrain. Either way train.py's
FeatureExtractor and cache (--cache_dir) compute the inputs once, and train.py's task,
optimiser, schedule and loss train them. The rules:
  random    at random
  margin    predict.py --suggest's rule (inference/suggest.py): the least sure by the top two
            classes' margin, from a pool of 10 x batch, skipping near-copies (cosine of the
            features above --similarity)
  spread    the same, at most 2 per predicted class before the least sure of the rest fill
            the batch (issue 34's class-balanced idea; not --suggest's rule: no better
            with the head alone)
  entropy   the same as margin by normalised entropy
Printed: the mean valid accuracy (and spread over --seeds) per rule per round, and the ratio:
the labels the rule needs to reach random's last-round accuracy (linear between rounds) over
random's labels at its last round (the goal: at most 60%). Runs of some --rules each (in
parallel) are joined with --merge, where they share the learner, the seeds and the rounds.
"""
import argparse
import json
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

import quality  # noqa: E402
from flower_classifier.data.folders import find_splits  # noqa: E402
from flower_classifier.data.transforms import eval_transform  # noqa: E402
from flower_classifier.inference.suggest import (  # noqa: E402
    MAX_SIMILARITY,
    POOL_FACTOR,
    certainties,
    diverse,
)
from flower_classifier.models.features import FeatureExtractor, split_features  # noqa: E402

SPREAD = 2  # photos per predicted class in the spread rule's first pass: 2 screened best of
# 1, 2, 3 (this benchmark with the head alone, seeds 0-2, 4 to 10 rounds)
STAGES = 2  # the stages train.py's default trains (its --train_stages)
RULES = {"random": None, "margin": ("margin", None), "spread": ("margin", SPREAD),
         "entropy": ("entropy", None)}  # rule: (certainty, photos per predicted class)


def load_features(data_dir, cache_dir):
    """(train features, train labels, valid features, valid labels, class count), readable
    images only, through train.py's extractor and cache."""
    class_to_idx, splits = find_splits(data_dir)
    splits = {name: splits[name] for name in ("train", "valid")}
    backbone = quality.feature_backbone()
    extractor = FeatureExtractor(backbone, quality.CPU, cache_dir=cache_dir,
                                 images=sum(len(split.paths) for split in splits.values()))
    features = split_features(extractor, splits, eval_transform(backbone.preprocess))
    data = []
    for name in ("train", "valid"):
        rows, ok = features[name]
        data += [rows[ok].float(), torch.tensor(splits[name].labels)[ok]]
    return (*data, len(class_to_idx))


class HeadLearner:
    """train.py's head alone (--train_stages 0, as the studio's quick retrain trains it) on the
    backbone features, trained as benchmarks/quality.py train_heads does."""

    def __init__(self, data_dir, cache_dir):
        (self.train, self.labels, self.valid, self.valid_labels,
         self.class_count) = load_features(data_dir, cache_dir)
        self.unit = torch.nn.functional.normalize(self.train, dim=1)
        self.heads = None

    def fit(self, labelled, seed):
        self.heads = quality.train_heads({}, self.train[labelled].half(), self.labels[labelled],
                                         self.class_count, seed)

    def valid_accuracy(self):
        predicted = quality.mean_logits(self.heads, self.valid).argmax(1)
        return (predicted == self.valid_labels).float().mean().item()

    def probabilities(self, rows):
        return quality.mean_logits(self.heads, self.train[rows]).softmax(1)


class StageLearner:
    """train.py's default: its last STAGES stages trained with the head on the cached
    activations (quality.py train_stage_task), as predict.py --suggest scores with a default
    checkpoint; photos scored mirror-averaged, as predict.py scores them. Near-copies are
    judged on the pretrained stages' features."""

    def __init__(self, data_dir, cache_dir):
        class_to_idx, splits = find_splits(data_dir)
        data = quality.activations_of({name: (splits[name].root, splits[name].paths,
                                              splits[name].labels) for name in ("train", "valid")},
                                      STAGES, cache_dir)
        self.train, self.labels = data["train"]["activations"], data["train"]["labels"]
        self.valid, self.valid_labels = data["valid"]["activations"], data["valid"]["labels"]
        self.class_count = len(class_to_idx)
        features = quality.pretrained_features({"train": data["train"]}, STAGES)
        self.unit = torch.nn.functional.normalize(features["train"]["plain"].float(), dim=1)
        self.task = None

    def fit(self, labelled, seed):
        splits = {"train": {"activations": self.train[labelled], "labels": self.labels[labelled]},
                  "valid": {"activations": self.valid, "labels": self.valid_labels}}
        self.task = quality.train_stage_task({"train_stages": STAGES}, splits, STAGES,
                                             self.class_count, seed)

    def valid_accuracy(self):
        predicted = quality.task_logits(self.task, "valid").argmax(1)
        return (predicted == self.valid_labels).float().mean().item()

    def probabilities(self, rows):
        return quality.model_logits(self.task.model, self.train[rows].split(256)).softmax(1)


LEARNERS = {"stages": StageLearner, "head": HeadLearner}
# The options a --results file records: --merge joins only runs that share them.
RUN_KEYS = ("learner", "start", "batch", "rounds", "similarity", "first_seed", "seeds")


def first_labels(labels, per_class, generator):
    """per_class random indices of each class."""
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        chosen += members[torch.randperm(len(members), generator=generator)[:per_class]].tolist()
    return chosen


def choose(rule, learner, unlabelled, batch, similarity, generator):
    """batch indices of unlabelled (a list) to label next, by the rule, from the learner's
    probabilities."""
    if rule == "random":
        order = torch.randperm(len(unlabelled), generator=generator)[:batch]
        return [unlabelled[i] for i in order.tolist()]
    by, per_class = RULES[rule]
    probabilities = learner.probabilities(unlabelled)
    scores = certainties(probabilities, by)
    pool = scores.argsort()[:POOL_FACTOR * batch].tolist()  # least sure first
    entries = [(scores[i].item(), i, None, probabilities[i], learner.unit[unlabelled[i]])
               for i in pool]
    return [unlabelled[entry[1]] for entry in diverse(entries, batch, similarity, per_class)]


def run_rule(rule, learner, args, seed):
    """[(labels, valid accuracy)] per round of one rule and seed."""
    generator = torch.Generator().manual_seed(seed)
    labelled = first_labels(learner.labels, args.start, generator)
    curve = []
    for round_number in range(args.rounds + 1):
        learner.fit(labelled, seed)
        curve.append((len(labelled), learner.valid_accuracy()))
        if round_number < args.rounds:
            taken = set(labelled)
            unlabelled = [i for i in range(len(learner.labels)) if i not in taken]
            labelled += choose(rule, learner, unlabelled, args.batch, args.similarity,
                               generator)
    return curve


def labels_to_reach(curve, target):
    """The labels at which the (labels, accuracy) curve first reaches target, linear between
    rounds; None if it never does."""
    for (before, low), (after, high) in zip(curve, curve[1:]):
        if high >= target:
            return before if low >= target else before + (after - before) * (
                (target - low) / (high - low))
    return curve[0][0] if curve and curve[0][1] >= target else None


def mean_curve(curves):
    return [(points[0][0], sum(accuracy for _, accuracy in points) / len(points))
            for points in zip(*curves)]


def summary(results):
    """{rule: [[labels, mean, min, max accuracy in %], ...]} over the seeds."""
    table = {}
    for rule, curves in results.items():
        accuracy = torch.tensor([[point[1] for point in curve] for curve in curves]) * 100
        table[rule] = [[curves[0][index][0], *(round(value, 2) for value in (
            column.mean().item(), column.min().item(), column.max().item()))]
            for index, column in enumerate(accuracy.T)]
    return table


def plot(table, path):
    """The summary's mean accuracy per rule against labels, with its min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for rule, rows in table.items():
        labels, mean, low, high = zip(*rows)
        axes.plot(labels, mean, marker="o", label=rule)
        axes.fill_between(labels, low, high, alpha=0.2)
    axes.set_xlabel("labelled photos")
    axes.set_ylabel("valid accuracy (%)")
    axes.set_title("Labels chosen by rule or at random (band: min-max of seeds)", fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", help="flowers folder with train/ and valid/")
    parser.add_argument("--cache_dir", default="/tmp/active_learning_cache",
                        help="train.py's feature cache for train/ and valid/")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--learner", choices=LEARNERS, default="stages",
                        help="what each round trains (default stages): train.py's default, its "
                        "last 2 stages with the head, as --suggest scores with a default "
                        "checkpoint; or head: the head alone (--train_stages 0), as the "
                        "studio's quick retrain")
    parser.add_argument("--start", type=int, default=5, help="labelled photos per class at first")
    parser.add_argument("--batch", type=int, default=102, help="photos labelled per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=0,
                        help="seeds first_seed to first_seed + seeds - 1 (default 0)")
    parser.add_argument("--similarity", type=float, default=MAX_SIMILARITY,
                        help="the rules' near-copy cosine (predict.py --suggest_similarity)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="accuracy vs labels")
    parser.add_argument("--results", default=None, metavar="JSON",
                        help="write the table (labels, mean, min, max per rule) there")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="instead of running: report (and --plot) the tables of these "
                        "--results files, runs of some --rules each (a rule's seeds are "
                        "independent of the other rules, so runs in parallel give the same)")
    return parser


def report(table):
    """Print the table (markdown) and each rule's ratio of labels to random's."""
    rules = list(table)
    print("\n| labels | " + " | ".join(rules) + " |")
    print("|---" * (len(rules) + 1) + "|")
    for index, (labels, *_) in enumerate(table[rules[0]]):
        cells = [f"{mean:.2f} (min {low:.2f}, max {high:.2f})"
                 for _, mean, low, high in (table[rule][index] for rule in rules)]
        print(f"| {labels} | " + " | ".join(cells) + " |")
    if "random" not in table:
        return
    last_labels, target = table["random"][-1][:2]
    for rule in (rule for rule in rules if rule != "random"):
        needed = labels_to_reach([row[:2] for row in table[rule]], target)
        print(f"{rule}: random's last accuracy {target:.2f}% at {last_labels} labels; " + (
            f"{rule} reaches it at {needed:.0f} labels: {needed / last_labels:.0%} "
            f"(goal <= 60%)" if needed is not None else f"{rule} never reaches it"))


def merged(paths):
    """(the runs' RUN_KEYS, the tables of --results files joined), when they come from one
    learner and the same seeds (their curves are comparable) and name each rule once."""
    table, runs = {}, {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        if "table" not in saved:
            raise SystemExit(f"{path} records no run (written before --merge checked them): "
                             "run its rules again with --results")
        runs[path] = {key: saved.get(key) for key in RUN_KEYS}
        repeated = set(table) & set(saved["table"])
        if repeated:
            raise SystemExit(f"{path} repeats {', '.join(sorted(repeated))}: merge each rule once")
        table.update(saved["table"])
    if len({tuple(run.values()) for run in runs.values()}) > 1:
        raise SystemExit("these results come from different runs, not comparable: "
                         + "; ".join(f"{path}: {run}" for path, run in runs.items()))
    return runs[paths[0]], {rule: table[rule] for rule in RULES if rule in table}


def main(args):
    run, table = (merged(args.merge) if args.merge
                  else ({key: getattr(args, key) for key in RUN_KEYS}, run_rules(args)))
    report(table)
    if args.results:
        Path(args.results).write_text(json.dumps({**run, "table": table}))
    if args.plot:
        plot(table, args.plot)
        print(f"saved {args.plot}")


def run_rules(args):
    """The summary table of each of args.rules over args.seeds."""
    started = time.perf_counter()
    learner = LEARNERS[args.learner](args.data_dir, args.cache_dir)
    print(f"{args.learner}: train {len(learner.labels)}, valid {len(learner.valid_labels)} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    results = {rule: [] for rule in args.rules}
    for rule in args.rules:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            results[rule].append(run_rule(rule, learner, args, seed))
        print(f"{rule}: {[f'{a:.2%}' for _, a in mean_curve(results[rule])]} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return summary(results)


if __name__ == "__main__":
    parser = get_args_parser()
    arguments = parser.parse_args()
    if not (arguments.data_dir or arguments.merge):
        parser.error("pass data_dir, or --merge with results files")
    main(arguments)
