"""Issue 34's time goals: predict.py --sort_into within 1.1x of --output, and --suggest within
1.2x of plain prediction, on the same photos.

    python benchmarks/labelling.py CHECKPOINT ../shared/data/flowers102/train --limit 5000
    python benchmarks/labelling.py CHECKPOINT ../shared/data/flowers102 --limit 50000 \
        --repeats 1 --commands print suggest     # --suggest at scale: 50,000 photos

A temporary folder of symlinks to the first --limit photos of the folder (sorted paths; nothing
copied; past the folder's last photo its photos again under other names) is predicted by
predict.py as a user runs it, each command in a fresh process, in --repeats rounds that
alternate the commands, in reverse order every other round (so that the load of other jobs
falls on all of them alike):
  output     predict.py PHOTOS CHECKPOINT --output preds.jsonl            (the yardstick)
  sort_into  predict.py PHOTOS CHECKPOINT --sort_into review/            (goal: <= 1.1x output)
  print      predict.py PHOTOS CHECKPOINT, printed (to /dev/null)          (plain prediction)
  suggest    predict.py PHOTOS CHECKPOINT --suggest N (N: --suggest)     (goal: <= 1.2x print)
Printed: each command's wall and CPU seconds (user + sys, its decoding workers' included: the
figure other jobs' load disturbs least) per round, and the ratios of their medians to its
yardstick's; and --suggest's peak resident memory (VmHWM of the process, from /proc) beside that
of a run on a tenth of the photos (memory flat in the number of photos).
"""
import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from flower_classifier.data.folders import iter_images  # noqa: E402

COMMANDS = ("output", "sort_into", "print", "suggest")


def linked(source, limit, folder):
    """folder/ holding symlinks to the first limit photos below source, which are listed
    again (linked under other names) as often as it takes to reach limit."""
    folder.mkdir(parents=True)
    index = 0
    while index < limit:
        before = index
        for path in iter_images(source):
            if index == limit:
                break
            (folder / f"{index:06d}-{Path(path).name}").symlink_to(Path(path).resolve())
            index += 1
        if index == before:
            raise SystemExit(f"{source} holds no photos")
    return folder


def peak_memory(process, peaks):
    """The process's VmHWM in MB, polled until it ends, into peaks (a list)."""
    status = Path(f"/proc/{process.pid}/status")
    peak = 0
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            break
        time.sleep(0.2)
    peaks.append(peak)


def timed(*arguments):
    """(wall seconds, CPU seconds (user + sys), peak MB) of predict.py with arguments."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "predict.py", *map(str, arguments)],
                               cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    peaks = []
    watcher = threading.Thread(target=peak_memory, args=(process, peaks))
    watcher.start()
    _, errors = process.communicate()
    watcher.join()
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"predict.py {' '.join(map(str, arguments))} failed:\n{errors[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, peaks[0] if peaks else 0


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("source", help="a folder of photos (searched recursively)")
    parser.add_argument("--limit", type=int, default=5000, help="photos to predict")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--suggest", type=int, default=50)
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS,
                        help="the commands to time (a ratio needs its yardstick too)")
    return parser


def main(args):
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        photos = linked(args.source, args.limit, work / "photos")
        small = linked(args.source, max(args.limit // 10, 1), work / "small")
        count = sum(1 for _ in iter_images(photos))
        runs = {name: [] for name in COMMANDS if name in args.commands}
        cpu = {name: [] for name in runs}
        peaks = []
        for round_number in range(args.repeats):
            commands = {
                "output": (photos, args.checkpoint, "--output", work / f"p{round_number}.jsonl"),
                "sort_into": (photos, args.checkpoint, "--sort_into", work / f"r{round_number}"),
                "print": (photos, args.checkpoint),
                "suggest": (photos, args.checkpoint, "--suggest", args.suggest)}
            order = list(runs) if round_number % 2 == 0 else list(runs)[::-1]
            for name in order:
                wall, seconds, peak = timed(*commands[name])
                runs[name].append(wall)
                cpu[name].append(seconds)
                if name == "suggest":
                    peaks.append(peak)
                print(f"round {round_number + 1}: {name} {wall:.1f} s wall, {seconds:.1f} s CPU",
                      flush=True)
        if "suggest" in runs:
            _, _, small_peak = timed(small, args.checkpoint, "--suggest", args.suggest)
    yardsticks = {name: other for name, other in (("sort_into", "output"), ("suggest", "print"))
                  if name in runs and other in runs}
    print(f"\n{count} photos, {args.repeats} rounds\n")
    print("| command | wall s per round | CPU s per round | x its yardstick: wall, CPU "
          "(medians) |")
    print("|---|---|---|---|")
    for name, walls in runs.items():
        ratio = ""
        if name in yardsticks:
            other = yardsticks[name]
            ratio = (f"{statistics.median(walls) / statistics.median(runs[other]):.2f}, "
                     f"{statistics.median(cpu[name]) / statistics.median(cpu[other]):.2f} "
                     f"x {other}")
        print(f"| {name} | {' / '.join(f'{wall:.1f}' for wall in walls)} | "
              f"{' / '.join(f'{seconds:.1f}' for seconds in cpu[name])} | {ratio} |")
    if peaks:
        print(f"\n--suggest peak memory: {count} photos {max(peaks)} MB, "
              f"{max(args.limit // 10, 1)} photos {small_peak} MB")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
