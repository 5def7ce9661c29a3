"""Load serve.py as a crowd of phones would, on 127.0.0.1 only, and check issue 13's goals.

    python benchmarks/serve_load.py checkpoints/checkpoint.pth
    python benchmarks/serve_load.py checkpoints/checkpoint.pth --load 1:50 8:100 --photos 50
    python benchmarks/serve_load.py checkpoints/checkpoint.pth --against ../before --load 8:200

It starts `serve.py CHECKPOINT --host 127.0.0.1 --port 0` (a free loopback port), sends a fixed
number of requests at each concurrency (`--load CONCURRENCY:REQUESTS ...`), one in ten of them a
bad upload (not an image, empty, truncated, wrong field name: each must get a 4xx answer), then
stops the server with SIGTERM. Then, with the server gone, it times Predictor.predict_files on
the same photos in this process: predict.py's in-process folder rate, the yardstick.
With --against, it compares two checkouts' servers instead, side by side under the same load.

Per concurrency it prints p50 and p99 latency of the good requests, images/s (good answers per
wall second), errors (a good request not answered 200, a bad one not answered 4xx, or a
connection failure), the mean model batch (from /health) and the server's resident memory after
the level. The client runs in this process, on the same machine: its CPU time is the server's
loss, so the figures are a floor.
"""
import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import httpx  # noqa: E402

from flower_classifier.cli.options import positive_int
from flower_classifier.data.folders import list_images

DEFAULT_IMAGES = PROJECT.parent / "shared" / "data" / "flowers102" / "test"
BAD_EVERY = 10  # one request in ten is a bad upload


def load_level(text):
    concurrency, _, requests = text.partition(":")
    return positive_int(concurrency), positive_int(requests)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="A bounded load on serve.py at 127.0.0.1, with bad uploads mixed in.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder of photos to send (searched recursively)")
    parser.add_argument("--photos", type=positive_int, default=None,
                        help="use only the first N photos (None: all), cycled through the requests")
    parser.add_argument("--load", type=load_level, nargs="+", default=[(1, 200), (8, 800), (32, 2000)],
                        metavar="CONCURRENCY:REQUESTS", help="the levels, run in order")
    parser.add_argument("--server_args", default="", help="more serve.py flags, e.g. "
                        "'--max_batch 32 --batch_wait_ms 5'")
    parser.add_argument("--against", type=Path, default=None, metavar="PROJECT",
                        help="instead: run PROJECT's serve.py (another checkout, e.g. before a "
                        "change) beside this one and feed both alternate batches at the first "
                        "--load level, six each; prints each server's CPU ms per request (robust "
                        "to other jobs' load) and images/s")
    return parser


def resident_mib(pid):
    """A process's resident memory (VmRSS) in MiB, None where /proc is absent."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def start_server(checkpoint, server_args, project=PROJECT):
    """project's serve.py on a free loopback port: (process, base URL), once /health answers."""
    process = subprocess.Popen(
        [sys.executable, "serve.py", str(Path(checkpoint).resolve()), "--host", "127.0.0.1",
         "--port", "0", *server_args.split()], cwd=project, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not match:
        process.kill()
        sys.exit(f"serve.py did not start: {line!r}")
    url = match[0]
    for _ in range(300):
        try:
            httpx.get(url + "health").raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    sys.exit("serve.py never answered /health")


def bad_upload(kind, photo):
    """httpx arguments of a bad upload: the four kinds a phone or a script might send."""
    return [{"files": {"file": ("notes.jpg", b"words, not pixels")}},
            {"files": {"file": ("empty.jpg", b"")}},
            {"files": {"file": ("cut.jpg", photo[: len(photo) // 2])}},
            {"files": {"photo": ("a.jpg", photo)}}][kind % 4]


async def run_level(url, photos, concurrency, requests):
    """Send `requests` requests, `concurrency` at a time; return the level's figures."""
    latencies, errors = [], 0
    numbers = iter(range(requests))

    async def worker(client):
        nonlocal errors
        for number in numbers:
            name, photo = photos[number % len(photos)]
            bad = number % BAD_EVERY == BAD_EVERY - 1
            upload = bad_upload(number // BAD_EVERY, photo) if bad else {
                "files": {"file": (name, photo)}}
            start = time.perf_counter()
            try:
                answer = await client.post("predict", **upload)
            except httpx.HTTPError:
                errors += 1
                continue
            if bad:
                errors += not 400 <= answer.status_code < 500
            elif answer.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0] * 99
    return {"concurrency": concurrency, "requests": requests, "good": len(latencies),
            "p50_ms": 1000 * quantiles[49], "p99_ms": 1000 * quantiles[98],
            "images_per_s": len(latencies) / wall, "errors": errors}


def model_counts(url):
    health = httpx.get(url + "health").json()
    return health["batches"], health["images"]


def load_server(args, photos):
    """Run every level against one server; (level figures, memory figures, server exit code)."""
    process, url = start_server(args.checkpoint, args.server_args)
    memory = {"started": resident_mib(process.pid)}
    busiest = max(concurrency for concurrency, _ in args.load)
    asyncio.run(run_level(url, photos, busiest, 2 * busiest))  # warm-up: the largest batches
    memory["warm"] = resident_mib(process.pid)
    levels = []
    for concurrency, requests in args.load:
        batches, images = model_counts(url)
        level = asyncio.run(run_level(url, photos, concurrency, requests))
        after_batches, after_images = model_counts(url)
        level["mean_batch"] = (after_images - images) / max(after_batches - batches, 1)
        level["server_mib"] = resident_mib(process.pid)
        level["crashed"] = process.poll() is not None
        levels.append(level)
        print_level(level)
    memory["end"] = resident_mib(process.pid)
    process.send_signal(signal.SIGTERM)
    return levels, memory, process.wait(timeout=60)


def folder_rate(checkpoint, paths):
    """images/s of Predictor.predict_files on the photos, in this process (predict.py's way)."""
    from flower_classifier.inference.predictor import Predictor

    predictor = Predictor(checkpoint)
    predictor.backbone_engine(len(paths))  # built before the clock starts, as serve.py does
    start = time.perf_counter()
    count = sum(prediction.ok for prediction in predictor.predict_files(paths, top_k=5))
    return count / (time.perf_counter() - start)


def print_level(level):
    print(f"{level['concurrency']:>11} {level['requests']:>8} {level['p50_ms']:>7.1f} "
          f"{level['p99_ms']:>7.1f} {level['images_per_s']:>8.1f} {level['errors']:>6} "
          f"{level['mean_batch']:>10.1f} {level['server_mib'] or 0:>10.0f}", flush=True)


def verdict(met):
    return "met" if met else "NOT met"


def read_photos(folder, count):
    """(paths, [(file name, bytes)]) of the first count photos below folder (None: all)."""
    paths = list_images(folder)[:count]
    if not paths:
        sys.exit(f"no photos in {folder}")
    return paths, [(Path(path).name, Path(path).read_bytes()) for path in paths]


def cpu_seconds(pid):
    """A process's user + system CPU time so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_by_side(args, photos, rounds=6):
    """This checkout's server and args.against's, fed alternate batches under the same load."""
    concurrency, requests = args.load[0]
    servers = {"this": start_server(args.checkpoint, args.server_args),
               str(args.against): start_server(args.checkpoint, args.server_args, args.against)}
    figures = {name: {"cpu_ms": [], "images_per_s": []} for name in servers}
    try:
        for process, url in servers.values():  # warm-up
            asyncio.run(run_level(url, photos, concurrency, 2 * concurrency))
        for _ in range(rounds):
            for name, (process, url) in servers.items():
                before = cpu_seconds(process.pid)
                level = asyncio.run(run_level(url, photos, concurrency, requests))
                figures[name]["cpu_ms"].append(
                    1000 * (cpu_seconds(process.pid) - before) / requests)
                figures[name]["images_per_s"].append(level["images_per_s"])
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    for name, figure in figures.items():
        print(f"{name}: server CPU {statistics.mean(figure['cpu_ms']):.2f} ms per request "
              f"({', '.join(f'{value:.1f}' for value in figure['cpu_ms'])}), "
              f"{statistics.mean(figure['images_per_s']):.1f} images/s "
              f"({', '.join(f'{value:.1f}' for value in figure['images_per_s'])})")


def main(args):
    paths, photos = read_photos(args.images, args.photos)
    if args.against:
        print(f"concurrency {args.load[0][0]}, {args.load[0][1]} requests per batch, one in "
              f"{BAD_EVERY} a bad upload")
        side_by_side(args, photos)
        return
    print(f"{len(paths)} photos from {args.images}; one request in {BAD_EVERY} is a bad upload; "
          f"serve.py {args.server_args}")
    print("concurrency requests  p50 ms  p99 ms images/s errors mean batch server MiB")
    levels, memory, exit_code = load_server(args, photos)
    rate = folder_rate(args.checkpoint, paths)
    # growth over the run: from the end of the warm-up (the first requests at the largest
    # concurrency start the threads and buffers that stay); from the start is printed too
    growth = memory["end"] - memory["warm"] if memory["end"] and memory["warm"] else None
    print(f"server memory: {memory['started']:.0f} MiB started, {memory['warm']:.0f} MiB after the "
          f"warm-up, {memory['end']:.0f} MiB at the end; exit code after SIGTERM {exit_code}")
    print(f"Predictor.predict_files in-process on the same photos: {rate:.1f} images/s")
    by_concurrency = {level["concurrency"]: level for level in levels}
    if 32 in by_concurrency:
        busy = by_concurrency[32]
        print(f"goal: no failed good request, no crash at concurrency 32 ({busy['requests']} "
              f"requests): {verdict(busy['errors'] == 0 and not busy['crashed'])}")
    if 8 in by_concurrency:
        ratio = by_concurrency[8]["images_per_s"] / rate
        print(f"goal: images/s at concurrency 8 >= 0.8x the folder rate: {ratio:.2f}x, "
              f"{verdict(ratio >= 0.8)}")
    if 1 in by_concurrency:
        p50 = by_concurrency[1]["p50_ms"]
        print(f"goal: p50 at concurrency 1 <= 60 ms: {p50:.1f} ms, {verdict(p50 <= 60)}")
    if growth is not None:
        print(f"goal: memory growth < 50 MB over the run: {growth:+.1f} MiB after the warm-up "
              f"({memory['end'] - memory['started']:+.1f} MiB from the server's start), "
              f"{verdict(growth * 1.048576 < 50)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
