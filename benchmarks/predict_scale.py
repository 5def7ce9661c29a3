"""predict.py --output at scale (issue 24): images/s on 1 and 2 processes, and on a folder of
100,000 files the listing time and each process's resident memory.

    python benchmarks/predict_scale.py checkpoints/checkpoint.pth
    python benchmarks/predict_scale.py checkpoints/checkpoint.pth --files 100000 --memory_seconds 40

Rate: `predict.py FOLDER CHECKPOINT --output` and `torchrun --nproc_per_node 2` of the same, each
timed on a small folder (--small photos) and on the whole --images folder; the difference of the
two times is the images' share, so start-up (imports, the model) cancels out.

Scale: a temporary folder of --files symlinks to the --images photos, all in one folder (the
listing holds one folder's names at a time, so this is its worst case), and one of 1,000. The
listing time is data.folders.iter_images over it in a fresh process. Resident memory: the peak
(VmHWM) of every process of a 2-process torchrun run (ranks and their decoding workers), read
from /proc every 0.2 s; the 1,000-file run goes to the end, the large one is stopped with
SIGTERM after --memory_seconds (memory does not grow with the images done: they go to the part
file). Goal: large <= 1.2 x small + 100 MB per process, listing <= 10 s.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from flower_classifier.cli.options import positive_int
from flower_classifier.data.folders import list_images

DEFAULT_IMAGES = PROJECT.parent / "shared" / "data" / "flowers102" / "valid"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="predict.py --output: rate on 1 and 2 processes, memory and listing at "
        "100,000 files.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder of photos (searched recursively)")
    parser.add_argument("--small", type=positive_int, default=64,
                        help="photos in the small folder whose time is subtracted")
    parser.add_argument("--files", type=positive_int, default=100_000,
                        help="files in the large folder (symlinks to the photos)")
    parser.add_argument("--memory_seconds", type=positive_int, default=40,
                        help="how long the large folder's run goes before it is stopped")
    parser.add_argument("--engine", default="auto", help="predict.py --engine")
    return parser


def link_folder(folder, photos, count):
    """count symlinks in one folder, cycling through photos."""
    folder.mkdir(parents=True)
    for number in range(count):
        os.symlink(photos[number % len(photos)], folder / f"{number:07d}.jpg")
    return folder


def predict_command(folder, checkpoint, output, processes, engine):
    script = [str(PROJECT / "predict.py"), str(folder), str(checkpoint), "--output", str(output),
              "--engine", engine]
    return (TORCHRUN if processes == 2 else [sys.executable]) + script


def timed_run(command):
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"predict.py failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def rate(folders, counts, checkpoint, processes, engine, work):
    """Images/s of the photos beyond the small folder's (start-up cancels out)."""
    seconds = [timed_run(predict_command(folder, checkpoint, work / f"rate-{processes}-{n}.jsonl",
                                         processes, engine))
               for folder, n in zip(folders, counts)]
    return (counts[1] - counts[0]) / (seconds[1] - seconds[0]), seconds


def proc_tree(root):
    """{pid: parent pid} of root and its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root: None}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree[pid], grew = parent, True
    return tree


def peak_memory(pid):
    """VmHWM, the process's peak resident memory, in MB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def memory_run(command, seconds):
    """Peak resident MB of every rank and worker of a torchrun run, the run stopped with
    SIGTERM after `seconds` (or at its end): {"rank N" or "rank N worker": MB}."""
    run = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    peaks, roles, deadline = {}, {}, time.monotonic() + seconds
    while run.poll() is None and time.monotonic() < deadline:
        tree = proc_tree(run.pid)
        ranks = sorted(pid for pid, parent in tree.items() if parent == run.pid)
        for pid, parent in tree.items():
            if pid in ranks:
                roles[pid] = f"rank {ranks.index(pid)}"
            elif parent in ranks:
                roles[pid] = f"rank {ranks.index(parent)} worker"
            else:
                continue
            peaks[pid] = max(peaks.get(pid, 0), peak_memory(pid) or 0)
        time.sleep(0.2)
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)
    run.wait()
    figures = {}
    for pid, role in roles.items():  # a rank's workers: the largest of them
        figures[role] = max(figures.get(role, 0), peaks[pid])
    return figures


def listing_seconds(folder):
    """data.folders.iter_images over folder in a fresh process (no warm Python objects)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from flower_classifier.data."
            "folders import iter_images; start = time.perf_counter(); n = sum(1 for _ in iter_images("
            "sys.argv[1])); print(n, time.perf_counter() - start)")
    result = subprocess.run([sys.executable, "-c", code, str(folder), str(PROJECT)],
                            capture_output=True, text=True, check=True)
    count, seconds = result.stdout.split()
    return int(count), float(seconds)


def main(args):
    photos = list_images(args.images)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        small = link_folder(work / "small", photos, args.small)
        print(f"rate: {len(photos)} photos of {args.images} minus {args.small}, "
              f"engine {args.engine}")
        one, seconds_one = rate([small, args.images], [args.small, len(photos)],
                                args.checkpoint, 1, args.engine, work)
        two, seconds_two = rate([small, args.images], [args.small, len(photos)],
                                args.checkpoint, 2, args.engine, work)
        print(f"  1 process:   {one:6.1f} images/s (runs {seconds_one[0]:.1f} s, "
              f"{seconds_one[1]:.1f} s)")
        print(f"  2 processes: {two:6.1f} images/s (runs {seconds_two[0]:.1f} s, "
              f"{seconds_two[1]:.1f} s), {two / one:.2f}x (goal >= 0.9x: "
              f"{'met' if two >= 0.9 * one else 'NOT met'})")

        thousand = link_folder(work / "thousand", photos, 1000)
        large = link_folder(work / "large", photos, args.files)
        count, seconds = listing_seconds(large)
        print(f"listing {count} files in one folder: {seconds:.2f} s (goal <= 10 s: "
              f"{'met' if seconds <= 10 else 'NOT met'})")
        base = memory_run(predict_command(thousand, args.checkpoint, work / "m1.jsonl", 2,
                                          args.engine), 600)
        big = memory_run(predict_command(large, args.checkpoint, work / "m2.jsonl", 2,
                                         args.engine), args.memory_seconds)
        print(f"peak resident memory, 2 processes, 1,000 files -> {args.files} files "
              f"(first {args.memory_seconds} s):")
        for role in sorted(base):
            limit = 1.2 * base[role] + 100
            print(f"  {role:16s} {base[role]:7.0f} MB -> {big.get(role, 0):7.0f} MB "
                  f"(goal <= {limit:.0f} MB: {'met' if big.get(role, 0) <= limit else 'NOT met'})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
