"""Inference engines for the frozen backbone: torch everywhere, OpenVINO on the CPU.

    engine = compile_backbone(backbone.model, crop=224, device=torch.device("cpu"), images=7370)
    features = engine(batch)            # float32 NCHW images in, float32 [N, D] features out
    engine.name, engine.precision       # e.g. "openvino", "bf16": part of the feature cache key

Why OpenVINO on the CPU (EfficientNet-Lite0, batch 64, model only, on the 2-core AVX-512 +
native-bf16 machine this was built on; figures from issue 12): torch eager fp32 58-62 img/s,
TorchScript frozen 92, torch bf16 autocast traced 131, ONNX Runtime fp32 144, OpenVINO bf16 565,
OpenVINO f32 116. torch.jit is deprecated, so the torch engine is plain eager code: the only
engine on a GPU (bf16 or fp16 autocast, as before) and the CPU's for small jobs or where
OpenVINO is missing. OpenVINO computes in bf16 only where the CPU does it natively (it lists
BF16 among its capabilities only with AVX512_BF16 or AMX), else in f32; heads trained on its
bf16 features score as those on torch's fp32 ones (benchmarks/engines.py, README).

Converting a model for OpenVINO (torch.export, then OpenVINO's frontend) costs 10-16 s on that
machine; importing OpenVINO, reading and compiling a converted model and the first batch about
0.25 s, less than torch's first eager call (0.4-2 s: oneDNN sets up each layer). So converted
models are kept on disk, named by weights_key() (the pretrained weights' identity, or a hash
of fine-tuned weights), and "auto" takes OpenVINO on the CPU whenever the converted model is
on disk (a one-image predict.py then never even builds the torch model), and otherwise for jobs
of MIN_OPENVINO_IMAGES images or more, where the one conversion per machine and backbone pays.
"""
import hashlib
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import torch

from flower_classifier.models.backbones import state_sha256
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError

ENGINE_CHOICES = ("auto", "torch", "openvino")
MIN_OPENVINO_IMAGES = 128


def autocast(device):
    """bf16 (or fp16) autocast on CUDA; a no-op on the CPU, where inference keeps torch's fp32
    (the reference path; OpenVINO is the fast one)."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@cache
def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast
    trains about 1.6-1.9x faster than float32 (measured on an AMD EPYC with avx512_bf16);
    elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & set(flags))


def default_engine_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flower_classifier" / "engines"


@cache
def openvino_core():
    """OpenVINO's runtime, or None where the package is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.Core()


def choose_engine(engine, device, images=None, converted=lambda: False):
    """The engine that "auto" stands for, for a job of `images` images (None: a large job);
    converted() says whether the converted model is on disk (asked only when it matters)."""
    if engine != "auto":
        return engine
    if device.type != "cpu" or openvino_core() is None:
        return "torch"
    large = images is None or images >= MIN_OPENVINO_IMAGES
    return "openvino" if large or converted() else "torch"


def engine_precision(name, device):
    """What the engine computes in, known without building it (for feature cache keys)."""
    if name == "openvino":
        capabilities = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return "bf16" if "BF16" in capabilities else "f32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def check_engine(name, device):
    """A clear error for an engine that cannot run here."""
    if name == "openvino" and device.type != "cpu":
        raise UserError("--engine openvino runs on the CPU; leave out --gpu, or use "
                        "--engine torch")
    if name == "openvino" and openvino_core() is None:
        raise UserError("--engine openvino needs the openvino package; pip install openvino, "
                        "or use --engine torch")


class TorchEngine:
    """The model itself, channels-last under inference mode (autocast on a GPU)."""
    name = "torch"

    def __init__(self, model, device):
        self.model = model.to(device, memory_format=torch.channels_last).eval()
        self.device = device
        self.precision = engine_precision(self.name, device)

    @torch.inference_mode()
    def __call__(self, images):
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with autocast(self.device):
            return self.model(images).float()


class OpenVINOEngine:
    """The model converted for OpenVINO and compiled for the CPU in engine_precision(), on the
    first call: a run whose features all come from the cache never pays for it."""
    name = "openvino"

    def __init__(self, model, crop, path):
        """model: a function building the torch model, called only where it must be converted;
        path: where the converted model is kept (converted_path)."""
        self.model, self.crop, self.path = model, crop, path
        self.precision = engine_precision(self.name, torch.device("cpu"))
        self.compiled = None

    def compile(self):
        self.compiled = openvino_core().compile_model(
            converted_model(self.model, self.crop, self.path), "CPU",
            {"INFERENCE_PRECISION_HINT": self.precision,
             # torch's threads: under torchrun distributed.init_distributed splits the cores
             "INFERENCE_NUM_THREADS": torch.get_num_threads(),
             # OpenVINO pins its threads to the first cores of the affinity mask: two torchrun
             # ranks of one thread each then share one core, and a core busy with another
             # process holds the pinned thread. The threads already follow the free cores
             # (utils.threads); the OS scheduler places them.
             "ENABLE_CPU_PINNING": False})
        compiled_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if compiled_precision != self.precision:  # the cache key must say what really ran
            raise RuntimeError(f"OpenVINO compiled for {compiled_precision}, not {self.precision}")

    def __call__(self, images):
        if self.compiled is None:
            self.compile()
        return torch.from_numpy(self.compiled(images.contiguous().numpy())[0])


def weights_key(arch, identity=None, state_dict=None):
    """What names a backbone's weights: the pretrained weights' identity (their package and file
    hash) where they are used unchanged, else a hash of the weights themselves (fine-tuned)."""
    if identity and identity.get("sha256"):
        return f"{arch} {sorted(identity.items())}"
    return f"{arch} sha256 {state_sha256(state_dict)}"


def converted_path(key, crop, cache_dir):
    """Where the converted model of the weights named key is kept: the key, the input size and
    OpenVINO's version make the folder name."""
    import openvino

    name = hashlib.sha256(f"{key} {crop} {openvino.__version__}".encode()).hexdigest()[:32]
    return Path(cache_dir).expanduser() / f"openvino-{name}" / "model.xml"


def convert_to_openvino(model, crop):
    """torch.export (not the deprecated TorchScript tracing) with any batch size, then
    OpenVINO's frontend."""
    import openvino

    example = torch.zeros(2, 3, crop, crop)
    with torch.no_grad():
        exported = torch.export.export(model.cpu().eval(), (example,),
                                       dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    return openvino.convert_model(exported)


def converted_model(model, crop, path):
    """The OpenVINO model of model() (a function building it): read from path, else converted
    and saved there (a folder renamed into place whole: a crash never leaves half a model)."""
    import openvino

    if path.is_file():
        try:
            return openvino_core().read_model(path)
        except RuntimeError as error:
            warn(f"converted model {path.parent} is damaged ({error}); converting it again")
            shutil.rmtree(path.parent, ignore_errors=True)
    converted = convert_to_openvino(model(), crop)
    cache_dir = path.parent.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".converting-"))
        try:
            openvino.save_model(converted, staging / path.name, compress_to_fp16=False)
            os.replace(staging, path.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only where the rename failed
    except OSError as error:  # the cache only saves time: a read-only or full disk is no error
        if not path.is_file():  # (else another process just saved the same model)
            warn(f"converted model not kept in {cache_dir} ({error}); the next run converts "
                 "it again")
    return converted


def compile_backbone(model, crop, device, engine="auto", images=None, cache_dir=None,
                     weights=None):
    """The backbone as an engine: callable on a float32 NCHW batch, returning float32
    features, with .name and .precision (known at once; OpenVINO compiles at the first call).

    model: the torch model, or a function building it (called only where it is needed: a
    predict.py whose converted model is on disk never builds it); images: the job's size, for
    "auto"; cache_dir: where converted models are kept (default: default_engine_cache_dir());
    weights: weights_key() of the model (default: the hash of its weights).
    """
    build = cache(model) if not isinstance(model, torch.nn.Module) else lambda: model

    @cache
    def path():
        key = weights or weights_key(type(build()).__name__, state_dict=build().state_dict())
        return converted_path(key, crop, cache_dir or default_engine_cache_dir())

    name = choose_engine(engine, device, images, converted=lambda: path().is_file())
    check_engine(name, device)
    if name == "openvino":
        return OpenVINOEngine(build, crop, path())
    return TorchEngine(build(), device)
