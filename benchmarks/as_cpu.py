"""Run a script as on another class of CPU: `python benchmarks/as_cpu.py avx2 train.py ...`.

The instruction sets are capped before torch and OpenVINO are imported (they read these
variables once), and the project is told the CPU computes no bf16, so it trains in float32 and
OpenVINO infers in f32 as they do on such a CPU. A simulation: caches and clocks stay this
machine's, and some of OpenVINO's kernels look at the real CPU flags.

  native   nothing changed
  avx512   oneDNN at AVX512_CORE_VNNI (no bf16 nor AMX)
  avx2     ATEN_CPU_CAPABILITY=avx2, oneDNN and MKL at AVX2
"""
import os
import runpy
import sys

LIMITS = {"native": {},
          "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                     "DNNL_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
          "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def without_bf16():
    """The project's view of the CPU: no native bf16 (training in float32, OpenVINO in f32)."""
    from flower_classifier.models import engines

    engines.cpu_has_native_bf16 = lambda: False
    precision = engines.engine_precision
    engines.engine_precision = lambda name, device: (
        "f32" if name == "openvino" else precision(name, device))


SIMULATED = "AS_CPU_SIMULATED"  # the class, for scripts that run others under it too


def main():
    cpu, script, *arguments = sys.argv[1:]
    os.environ.update(LIMITS[cpu])
    os.environ[SIMULATED] = cpu
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # project
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if cpu != "native":
        without_bf16()
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
