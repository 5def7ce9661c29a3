"""serve.py under hostile clients on 127.0.0.1 while good requests are measured (issue 23's goals).

    python benchmarks/serve_hostile.py checkpoints/checkpoint.pth
    python benchmarks/serve_hostile.py checkpoints/checkpoint.pth --seconds 60 --uploads 48

It starts `serve.py CHECKPOINT --host 127.0.0.1 --port 0`, then:
1. sends each hostile payload alone (extreme aspect ratios, a 16-bit PNG just under the pixel
   limit, an ICO around a large PNG, EPS, a form of boundary look-alikes, ...) and prints its
   status and how much the server's resident memory grew (sampled every 50 ms);
2. for --seconds, at once: --slow clients sending request headers one byte a second, --idle
   connections that send nothing (each reconnects when closed), --uploads loops of ~20-MB uploads
   (random bytes, boundary look-alikes, a large noise PNG in turn), a /health probe every 0.5 s,
   and good photo requests at --concurrency, whose latency and failures are the figures.

Printed: per payload its status and memory growth; p50/p99 of good requests and their failures,
/health's slowest answer, the longest life of a slow or idle connection, upload answers by status,
the largest memory growth; each goal met or not. The clients run in this process on the same
cores: their CPU time is the server's loss, so the figures are a floor.
"""
import argparse
import asyncio
import io
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from serve_load import (  # noqa: E402
    DEFAULT_IMAGES,
    read_photos,
    resident_mib,
    start_server,
    verdict,
)

from flower_classifier.cli.options import positive_int
from flower_classifier.data.images import MAX_PIXELS

UPLOAD_BYTES = 19_500_000  # under serve.py's default 20 MB limit
QUIET_SECONDS = 15
GOALS = {"p99_s": 2.0, "health_s": 0.2, "connection_life_s": 30, "memory_mib": 512}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Hostile clients against serve.py at 127.0.0.1 while good requests are timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder of photos for the good requests (searched recursively)")
    parser.add_argument("--photos", type=positive_int, default=50, help="photos to cycle through")
    parser.add_argument("--seconds", type=positive_int, default=45,
                        help="length of the flood (the slow clients need >30 s to show the bound)")
    parser.add_argument("--slow", type=positive_int, default=200, help="slow-header clients")
    parser.add_argument("--idle", type=positive_int, default=100, help="idle connections")
    parser.add_argument("--uploads", type=positive_int, default=24, help="concurrent large uploads")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="good requests at once")
    parser.add_argument("--server_args", default="", help="more serve.py flags")
    return parser


def encoded(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def sixteen_bit_png():
    """A 16-bit greyscale PNG of a gradient just under the pixel limit (about 1 MB)."""
    side = int(MAX_PIXELS ** 0.5) - 1
    row = np.linspace(0, 65535, side).astype(np.uint16)
    return encoded(Image.fromarray(np.broadcast_to(row, (side, side)).copy()), "PNG")


def ico_around(png):
    entry = bytes([0, 0, 0, 0, 1, 0, 32, 0]) + len(png).to_bytes(4, "little") + \
        (22).to_bytes(4, "little")
    return b"\0\0\1\0\1\0" + entry + png


def lookalike_form(size):
    part = b"\r\n--B-x"
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
            + part * (size // len(part)) + b"\r\n--B--\r\n")
    return body, "multipart/form-data; boundary=B"


def noise_png(size):
    """A PNG of random pixels of about size bytes: it must be decoded in full."""
    side = int((size / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    return encoded(Image.fromarray(pixels), "PNG", compress_level=1)


def payloads():
    """name -> (body, content type) of the single hostile payloads."""
    image = "image/png"
    return {
        "4000x1 PNG": (encoded(Image.new("RGB", (4000, 1)), "PNG"), image),
        "200000x1 PNG": (encoded(Image.new("L", (200000, 1)), "PNG"), image),
        "16-bit PNG under the pixel limit": (sixteen_bit_png(), image),
        "1-bit PNG over the pixel limit": (encoded(Image.new("1", (9500, 9500)), "PNG"), image),
        "ICO around a 177-Mpx PNG": (ico_around(encoded(Image.new("1", (13300, 13300)), "PNG")),
                                     "image/x-icon"),
        "EPS with an endless loop": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"
                                     b"{ } loop\n%%EOF\n", "application/postscript"),
        "form of boundary look-alikes": lookalike_form(UPLOAD_BYTES),
        "noise PNG": (noise_png(UPLOAD_BYTES), image),
    }


class MemoryWatch:
    """The server's resident memory sampled every 50 ms; peak growth over a baseline."""

    def __init__(self, pid):
        self.pid, self.peak = pid, 0.0

    async def run(self, baseline):
        self.peak = baseline
        while True:
            self.peak = max(self.peak, resident_mib(self.pid) or 0)
            await asyncio.sleep(0.05)


async def single_payloads(url, pid):
    """(name, status, growth MiB) of each payload sent alone."""
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for name, (body, content_type) in payloads().items():
            baseline = resident_mib(pid)
            watch = MemoryWatch(pid)
            watcher = asyncio.create_task(watch.run(baseline))
            try:
                status = (await client.post("predict", content=body,
                                            headers={"Content-Type": content_type})).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            await asyncio.sleep(0.2)
            watcher.cancel()
            results.append((name, status, watch.peak - baseline))
            print(f"  {name:<34} {status!s:>4} {watch.peak - baseline:+8.1f} MiB", flush=True)
    return results


class Lives:
    """How long the server kept each slow or idle connection open."""

    def __init__(self):
        self.closed, self.open_since = [], {}


async def hold_connection(port, lives, stop, trickle):
    """Reconnect until stop: each connection sends its head one byte a second (trickle) or
    nothing, and its life ends when the server closes it."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 200
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        lives.open_since[id(writer)] = opened
        try:
            for byte in head if trickle else []:
                writer.write(bytes([byte]))
                await writer.drain()
                if await read_or_wait(reader, 1.0, stop):
                    break
            else:
                await read_or_wait(reader, 3600, stop)
        except OSError:
            pass
        del lives.open_since[id(writer)]
        if not stop.is_set():
            lives.closed.append(time.monotonic() - opened)
        writer.close()


async def read_or_wait(reader, seconds, stop):
    """True once the server closed the connection (or stop is set), after at most seconds."""
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except asyncio.TimeoutError:
        return stop.is_set()
    return data == b"" or stop.is_set()


async def upload_loop(url, bodies, statuses, stop):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        number = 0
        while not stop.is_set():
            body, content_type = bodies[number % len(bodies)]
            number += 1
            try:
                answer = await client.post("predict", content=body,
                                           headers={"Content-Type": content_type})
                statuses[answer.status_code] += 1
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1


async def good_loop(client, photos, latencies, failures, stop):
    number = 0
    while not stop.is_set():
        name, photo = photos[number % len(photos)]
        number += 1
        start = time.perf_counter()
        try:
            answer = await client.post("predict", files={"file": (name, photo)})
        except httpx.HTTPError as error:
            failures[type(error).__name__] += 1
            continue
        if answer.status_code == 200:
            latencies.append(time.perf_counter() - start)
        else:
            failures[answer.status_code] += 1


async def health_loop(url, times, failures, stop):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = (await client.get("health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            times.append(time.perf_counter() - start)
            if not ok:
                failures.append(start)
            await asyncio.sleep(0.5)


async def attackers(url, slow, idle, uploads, seconds):
    """The slow, idle and upload clients for seconds: (lives of closed connections, ages of those
    still open, upload answers by status)."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    stop = asyncio.Event()
    lives, statuses = Lives(), Counter()
    bodies = [(os.urandom(UPLOAD_BYTES), "image/jpeg"), lookalike_form(UPLOAD_BYTES),
              (noise_png(UPLOAD_BYTES), "image/png")]
    tasks = [asyncio.create_task(hold_connection(port, lives, stop, trickle=True))
             for _ in range(slow)]
    tasks += [asyncio.create_task(hold_connection(port, lives, stop, trickle=False))
              for _ in range(idle)]
    tasks += [asyncio.create_task(upload_loop(url, bodies, statuses, stop))
              for _ in range(uploads)]
    await asyncio.sleep(seconds)
    now = time.monotonic()
    still_open = [now - opened for opened in lives.open_since.values()]
    stop.set()
    await asyncio.wait(tasks, timeout=150)
    return lives.closed, still_open, statuses


def attack(url, slow, idle, uploads, seconds, results):
    """attackers() in a process of its own, so that its CPU time does not delay the timed
    clients' event loop (it still competes for the cores, as a remote attacker would not)."""
    results.put(asyncio.run(attackers(url, slow, idle, uploads, seconds)))


async def measured(args, url, pid, photos, seconds):
    """Good requests, /health probes and the server's memory for seconds."""
    stop = asyncio.Event()
    latencies, failures, health_times, health_failures = [], Counter(), [], []
    watch = MemoryWatch(pid)
    baseline = resident_mib(pid)
    watcher = asyncio.create_task(watch.run(baseline))
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        tasks = [asyncio.create_task(good_loop(client, photos, latencies, failures, stop))
                 for _ in range(args.concurrency)]
        tasks.append(asyncio.create_task(health_loop(url, health_times, health_failures, stop)))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait(tasks, timeout=150)
    watcher.cancel()
    return {"latencies": latencies, "failures": failures, "health_times": health_times,
            "health_failures": len(health_failures), "growth": watch.peak - baseline}


def flood(args, url, pid, photos):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    attacker = context.Process(target=attack, args=(url, args.slow, args.idle, args.uploads,
                                                    args.seconds, results))
    attacker.start()
    time.sleep(2)  # the attackers' process starting and their connections opening
    figures = asyncio.run(measured(args, url, pid, photos, args.seconds))
    figures["lives"], figures["still_open"], figures["uploads"] = results.get(timeout=300)
    attacker.join(timeout=60)
    return figures


def main(args):
    _, photos = read_photos(args.images, args.photos)
    process, url = start_server(args.checkpoint, args.server_args)
    try:
        print(f"serve.py {args.server_args}; each payload alone: status, memory growth")
        singles = asyncio.run(single_payloads(url, process.pid))
        quiet = asyncio.run(measured(args, url, process.pid, photos, QUIET_SECONDS))
        print(f"without attackers for {QUIET_SECONDS} s (the machine's own load): "
              f"{timing_line(quiet)}", flush=True)
        print(f"flood for {args.seconds} s: {args.slow} slow-header clients, {args.idle} idle "
              f"connections, {args.uploads} concurrent ~{UPLOAD_BYTES / 1e6:.0f}-MB uploads; "
              f"good requests at concurrency {args.concurrency}", flush=True)
        figures = flood(args, url, process.pid, photos)
        crashed = process.poll() is not None
    finally:
        process.terminate()
        process.wait(timeout=60)
    report(singles, figures, crashed)


def percentiles(values):
    """(p50, p99, max) of values; NaN where there are too few."""
    if len(values) < 2:
        return math.nan, math.nan, max(values, default=math.nan)
    quantiles = statistics.quantiles(values, n=100)
    return quantiles[49], quantiles[98], max(values)


def timing_line(figures):
    good = percentiles(figures["latencies"])
    health = percentiles(figures["health_times"])
    failures = sum(figures["failures"].values())
    return (f"good requests {len(figures['latencies'])} answered, p50 {good[0]:.3f} s, p99 "
            f"{good[1]:.3f} s, failures {failures} {dict(figures['failures'])}; /health "
            f"{len(figures['health_times'])} probes, p50 {health[0]:.3f} s, p99 {health[1]:.3f} "
            f"s, slowest {health[2]:.3f} s, {figures['health_failures']} not 200")


def report(singles, figures, crashed):
    p99 = percentiles(figures["latencies"])[1]
    failures = sum(figures["failures"].values())
    slowest_health = percentiles(figures["health_times"])[2]
    longest_life = max(figures["lives"] + figures["still_open"], default=0.0)
    print(f"under attack: {timing_line(figures)}")
    print(f"slow and idle connections: {len(figures['lives'])} closed by the server, longest life "
          f"{longest_life:.1f} s; {len(figures['still_open'])} open at the end")
    print(f"large uploads answered: {dict(figures['uploads'])}")
    print(f"server memory growth: flood {figures['growth']:+.1f} MiB, largest single payload "
          f"{max(growth for *_, growth in singles):+.1f} MiB; crashed: {crashed}")
    server_errors = [name for name, status, _ in singles if isinstance(status, int)
                     and status >= 500 and status != 503]
    server_errors += [status for status in figures["uploads"] if isinstance(status, int)
                      and status >= 500 and status != 503]
    print(f"goal: good p99 <= {GOALS['p99_s']} s with zero failures: "
          f"{verdict(p99 <= GOALS['p99_s'] and failures == 0 and not crashed)}")
    print(f"goal: every slow or idle connection closed within {GOALS['connection_life_s']} s: "
          f"{verdict(longest_life <= GOALS['connection_life_s'])}")
    print(f"goal: /health within {GOALS['health_s']} s throughout: "
          f"{verdict(slowest_health <= GOALS['health_s'] and not figures['health_failures'])}")
    growth = max(figures["growth"], *(growth for *_, growth in singles))
    print(f"goal: memory growth <= {GOALS['memory_mib']} MiB: {growth:+.1f} MiB, "
          f"{verdict(growth <= GOALS['memory_mib'])}")
    print(f"goal: no 5xx but 503: {server_errors or 'none'}, {verdict(not server_errors)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
