"""Inference engines: the same features from each, converted models kept on disk by weights."""
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from flower_classifier.data.transforms import eval_transform
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models import engines
from flower_classifier.models.backbones import Backbone, Preprocess
from flower_classifier.models.engines import choose_engine, compile_backbone
from flower_classifier.models.features import FeatureExtractor
from flower_classifier.training.tasks import base
from flower_classifier.utils.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def openvino():
    """OpenVINO's runtime: its tests are skipped on a machine without the package, and fail in
    CI (CI=true), where requirements.txt installs it and a skip would hide untested code."""
    core = engines.openvino_core()
    if core is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("openvino is not installed: CI installs requirements.txt, which needs it")
        pytest.skip("openvino not installed")
    return core


def tiny_backbone(seed=0):
    """Convolution, BatchNorm, ReLU and pooling: the layer kinds of the real backbones."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def converted(openvino, tmp_path_factory):
    """A cache folder holding tiny_backbone() converted once: conversions take seconds."""
    cache = tmp_path_factory.mktemp("engines")
    engine = compile_backbone(tiny_backbone(), 32, CPU, engine="openvino", cache_dir=cache)
    assert not list(cache.iterdir())  # converted at the first call, not before
    engine(torch.zeros(1, 3, 32, 32))
    return cache


def test_openvino_features_match_torch_at_its_precision(converted, openvino):
    model, images = tiny_backbone(), torch.randn(5, 3, 32, 32)
    reference = compile_backbone(model, 32, CPU, engine="torch")
    engine = compile_backbone(model, 32, CPU, engine="openvino", cache_dir=converted)
    assert (reference.name, reference.precision) == ("torch", "fp32")
    native_bf16 = "BF16" in openvino.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert (engine.name, engine.precision) == ("openvino", "bf16" if native_bf16 else "f32")
    expected, features = reference(images), engine(images)
    assert features.dtype == torch.float32 and features.shape == (5, 8)
    tolerance = 3e-2 if native_bf16 else 1e-4
    assert torch.allclose(features, expected, atol=tolerance, rtol=tolerance)
    assert engine(images[:1]).shape == (1, 8)  # any batch size, not only the example's


def test_converted_model_is_reused_and_keyed_by_the_weights(converted, monkeypatch):
    model = tiny_backbone()
    assert len(list(converted.glob("openvino-*/model.xml"))) == 1

    def refuse(*args):
        raise AssertionError("converted again although the converted model is on disk")

    monkeypatch.setattr(engines, "convert_to_openvino", refuse)
    engine = compile_backbone(model, 32, CPU, engine="openvino", cache_dir=converted)
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(engine(images), model(images), atol=3e-2)
    tuned = tiny_backbone()
    with torch.no_grad():
        tuned[0].weight[0, 0, 0, 0] += 1.0  # one fine-tuned weight: another converted model
    key = engines.weights_key("tiny", state_dict=model.state_dict())
    assert engines.weights_key("tiny", state_dict=tuned.state_dict()) != key
    assert engines.converted_path(key, 64, converted) != engines.converted_path(key, 32, converted)
    pretrained = {"name": "package", "sha256": "ab12"}
    assert engines.weights_key("tiny", pretrained, model.state_dict()) != engines.weights_key(
        "tiny", {**pretrained, "sha256": "cd34"}, model.state_dict())


def test_damaged_converted_model_is_converted_again(converted, tmp_path, capsys):
    shutil.copytree(converted, tmp_path, dirs_exist_ok=True)
    (saved,) = tmp_path.glob("openvino-*/model.xml")
    saved.write_text("<net>cut short")
    model, images = tiny_backbone(), torch.randn(2, 3, 32, 32)
    engine = compile_backbone(model, 32, CPU, engine="openvino", cache_dir=tmp_path)
    assert torch.allclose(engine(images), model(images), atol=3e-2)
    assert "damaged" in capsys.readouterr().err
    assert "<layers>" in saved.read_text()


def test_unwritable_cache_only_warns(openvino, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    engine = compile_backbone(tiny_backbone(), 32, CPU, engine="openvino", cache_dir=blocker)
    assert engine(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    assert "not kept" in capsys.readouterr().err


def test_auto_takes_openvino_for_large_cpu_jobs_only(openvino):
    assert choose_engine("auto", CPU, images=engines.MIN_OPENVINO_IMAGES) == "openvino"
    assert choose_engine("auto", CPU) == "openvino"
    assert choose_engine("auto", CPU, images=1) == "torch"
    assert choose_engine("auto", torch.device("cuda")) == "torch"
    assert choose_engine("torch", CPU, images=10_000) == "torch"


def test_openvino_on_a_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="runs on the CPU"):
        compile_backbone(tiny_backbone(), 32, torch.device("cuda"), engine="openvino")


def tiny_spec():
    return Backbone(name="tiny", model=tiny_backbone(), feature_dim=8,
                    preprocess=Preprocess(resize=40, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3),
                    weights={"name": "tiny"}, pretrained=False, stage_list=lambda model: [model])


def test_feature_cache_keeps_each_engines_features_apart(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "default_engine_cache_dir", lambda: converted)
    paths = []
    for index, color in enumerate([(200, 30, 60), (20, 180, 90), (90, 90, 250)]):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.new("RGB", (48, 40), color).save(paths[-1])
    transform = eval_transform(tiny_spec().preprocess)

    def extract(engine):
        extractor = FeatureExtractor(tiny_spec(), CPU, cache_dir=tmp_path / "cache", workers=0,
                                     engine=engine)
        features, ok = extractor.features(tmp_path, paths, transform)
        return extractor, features, ok

    torch_run, torch_features, ok = extract("torch")
    openvino_run, openvino_features, _ = extract("openvino")
    assert ok.all() and torch_run.computed == openvino_run.computed == 3
    assert torch.allclose(openvino_features.float(), torch_features.float(), atol=3e-2)
    warm, warm_features, _ = extract("openvino")
    assert warm.computed == 0 and torch.equal(warm_features, openvino_features)
    assert warm.engine.compiled is None  # all from the cache: nothing converted or compiled


def test_predictor_takes_openvino_for_large_folders_or_once_converted(openvino, trained,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "default_engine_cache_dir", lambda: tmp_path)
    predictor = Predictor(trained[1] / "checkpoint.pth")
    assert predictor.backbone_engine(1).name == "torch"
    assert predictor.backbone_engine(engines.MIN_OPENVINO_IMAGES).name == "openvino"
    assert Predictor(trained[1] / "checkpoint.pth", engine="torch").backbone_engine(
        10_000).name == "torch"
    # Once the converted model is on disk, even one image goes through OpenVINO, and the
    # torch backbone (timm, weights) is never built.
    fresh = Predictor(trained[1] / "checkpoint.pth")
    path = engines.converted_path(fresh.weights, fresh.preprocess.crop, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("<net/>")
    assert fresh.backbone_engine(1).name == "openvino" and fresh._model is None


def test_training_autocasts_to_bf16_only_where_the_cpu_computes_it(monkeypatch):
    """Training steps on the CPU run in bf16 where it is native (faster, same accuracy) and in
    float32 elsewhere; inference on the CPU stays float32."""
    layer = nn.Linear(8, 4)
    inputs = torch.randn(2, 8)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda native=native: native)
        with base.training_autocast(CPU):
            assert layer(inputs).dtype == dtype
        with engines.autocast(CPU):
            assert layer(inputs).dtype == torch.float32


def cpuinfo_has_native_bf16():
    """Whether /proc/cpuinfo lists a bf16 instruction set (AVX512-BF16 or AMX-BF16), read here
    independently of models/engines.py; None off Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def test_bf16_detection_matches_this_cpus_flags():
    """Not stubbed: this machine's /proc/cpuinfo decides, and training autocasts to match."""
    native = cpuinfo_has_native_bf16()
    if native is None:
        pytest.skip("no /proc/cpuinfo here")
    native = native and torch.backends.mkldnn.is_available()  # bf16 kernels need oneDNN
    assert engines.cpu_has_native_bf16() is native
    layer, inputs = nn.Linear(8, 4), torch.randn(2, 8)
    with base.training_autocast(CPU):
        assert layer(inputs).dtype == (torch.bfloat16 if native else torch.float32)


def test_threads_follow_the_cores_other_processes_leave_free(monkeypatch):
    """Another process busy on one of two cores leaves one thread; none busy, two; torchrun's
    two processes on one machine take one each (the clocks are made up, the rule is real)."""
    from flower_classifier.utils import threads

    clock = {"busy": 0.0, "own": 0.0, "now": 0.0}
    monkeypatch.setattr(threads, "machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads, "own_seconds", lambda: clock["own"])
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(threads, "cores_available", lambda: 2)

    def free_after(others, own, seconds=10.0):
        window = threads.Window()
        clock["busy"] += others + own
        clock["own"] += own
        clock["now"] += seconds
        return threads.free_cores(window)

    assert free_after(others=0.0, own=20.0) == 2
    assert free_after(others=10.0, own=10.0) == 1          # one core taken all along
    assert free_after(others=20.0, own=0.0) == 1           # never fewer than one thread
    monkeypatch.setattr(threads, "cores_available", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert free_after(others=10.0, own=10.0) == 1           # the other rank is expected


def test_threads_flag_is_checked_like_every_flag(capsys, monkeypatch):
    import os

    import train
    from flower_classifier.cli.options import use_threads

    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_info:
            train.get_args_parser().parse_args(["data", "--threads", bad])
        assert exit_info.value.code == 2
        assert "argument --threads" in capsys.readouterr().err
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        use_threads(os.cpu_count() + 1)
        assert "more than this machine's" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("FLOWER_CLASSIFIER_THREADS", "x")
    from flower_classifier.utils.errors import UserError
    from flower_classifier.utils.threads import default_threads
    with pytest.raises(UserError, match="FLOWER_CLASSIFIER_THREADS"):
        default_threads()


def test_training_reads_the_free_cores_again_after_each_epoch(subset, tmp_path, monkeypatch):
    """Without --threads, a core taken by another process during training leaves the next
    epochs one thread (the other process's CPU time is made up; the trainer's rule is real)."""
    import train
    from conftest import train_args
    from flower_classifier.utils import threads

    monkeypatch.delenv("FLOWER_CLASSIFIER_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores_available", lambda: 2)
    busy = {"seconds": 0.0}

    def machine_busy():  # another process busy on one core, this one's time on top
        busy["seconds"] += 1.0
        return threads.own_seconds() + busy["seconds"] * 1e3

    monkeypatch.setattr(threads, "machine_busy_seconds", machine_busy)
    seen = []
    real_apply = threads.ThreadPolicy.apply

    def recording_apply(self, window=None):
        seen.append(real_apply(self, window))
        return seen[-1]

    monkeypatch.setattr(threads.ThreadPolicy, "apply", recording_apply)
    before = torch.get_num_threads()
    try:
        train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--epochs", "2",
                              "--no_data_check"))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1, 1]  # the command's, before the first epoch, after each of 2


PINNING_VARIABLES = ("OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY", "GOMP_CPU_AFFINITY")


def affinities_while(work, seconds):
    """The CPU sets this process's threads were allowed, sampled while work() ran repeatedly
    in another thread (OpenVINO pins only during an inference)."""
    seen, done = set(), threading.Event()

    def repeat():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            work()
        done.set()

    worker = threading.Thread(target=repeat)
    worker.start()
    while not done.is_set():
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that has just ended
                seen.add(frozenset(os.sched_getaffinity(int(task.name))))
    worker.join()
    return seen


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or len(os.sched_getaffinity(0)) < 2
                    or any(os.environ.get(name) for name in PINNING_VARIABLES),
                    reason="needs Linux, two CPUs, and torch's threads not pinned by OpenMP")
def test_openvino_leaves_its_threads_unpinned(converted, monkeypatch):
    """Pinned, two torchrun ranks of one thread each ran on the same core at half speed, and a
    core busy with another process held the thread pinned to it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    engine = compile_backbone(tiny_backbone(), 32, CPU, engine="openvino", cache_dir=converted)
    images = torch.zeros(64, 3, 32, 32)
    assert affinities_while(lambda: engine(images), seconds=1.0) == {
        frozenset(os.sched_getaffinity(0))}
