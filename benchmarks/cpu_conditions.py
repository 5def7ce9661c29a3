"""Issue 31: an epoch of the default's trained stages on the CPUs people have, idle and with one
core taken by another process, with the threads following the free cores (the default) and
fixed at every core (what train.py did before).

    python benchmarks/cpu_conditions.py ../shared/data/flowers102
    python benchmarks/cpu_conditions.py ../shared/data/flowers102 --cpus avx2 --epochs 3

Each figure is one warm train.py run (the activations come from a cache that a first run of each
CPU class fills: bf16 and f32 activations are cached apart), its epochs' seconds read from the
log, the first epoch left out (it warms oneDNN up). CPU classes
are simulated on this machine before torch is imported (benchmarks/as_cpu.py):
  native   as the machine is (bf16 where it has AVX512-BF16 or AMX)
  avx512   AVX-512 without bf16: oneDNN capped at AVX512_CORE_VNNI, training in float32
  avx2     AVX2 only, as most laptops: ATEN_CPU_CAPABILITY=avx2, oneDNN and MKL capped at AVX2,
           training in float32
The busy core is `python -c 'while True: pass'`, started before the run and stopped after.
All rows come from one run on one machine: compare ratios, not seconds across machines.
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
AS_CPU = Path(__file__).with_name("as_cpu.py")
CPUS = ("native", "avx512", "avx2")
EPOCH_LINE = re.compile(r"^epoch +\d+/\d+ .* ([\d.]+) s$", re.MULTILINE)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="flowers folder with train/, valid/ and test/")
    parser.add_argument("--cpus", nargs="+", choices=CPUS, default=list(CPUS))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    parser.add_argument("--cache_dir", default=None,
                        help="a feature cache to reuse (default: a temporary one)")
    return parser


def epoch_seconds(cpu, data_dir, cache_dir, epochs, threads):
    """The median seconds of the epochs after the first of one warm train.py run."""
    with tempfile.TemporaryDirectory() as save_dir:
        flags = ["--threads", str(threads)] if threads else []
        result = subprocess.run(
            [sys.executable, str(AS_CPU), cpu, str(PROJECT / "train.py"), str(data_dir),
             "--save_dir", save_dir, "--cache_dir", str(cache_dir), "--epochs", str(epochs),
             "--no_data_check", *flags], capture_output=True, text=True, cwd=PROJECT,
            env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    if result.returncode:
        raise SystemExit(f"train.py failed under {cpu}:\n{result.stderr[-2000:]}")
    times = [float(value) for value in EPOCH_LINE.findall(result.stdout)]
    return statistics.median(times[1:] or times)


class BusyCore:
    """Another process keeping one core busy while the block runs."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def main(args):
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(args.cache_dir or Path(scratch) / "cache")
        print(f"{'CPU':8} {'idle':>8} {'busy, all cores':>16} {'busy, free cores':>17}"
              f"  ratios to idle")
        for cpu in args.cpus:
            # The cache is keyed by the engine's precision: each CPU class fills its own once.
            epoch_seconds(cpu, args.data_dir, cache, 1, None)
            idle = epoch_seconds(cpu, args.data_dir, cache, args.epochs, None)
            with BusyCore():
                fixed = epoch_seconds(cpu, args.data_dir, cache, args.epochs, 2)
                following = epoch_seconds(cpu, args.data_dir, cache, args.epochs, None)
            print(f"{cpu:8} {idle:7.1f}s {fixed:15.1f}s {following:16.1f}s"
                  f"  {fixed / idle:.2f}x  {following / idle:.2f}x (goal <= 2.2x)", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
