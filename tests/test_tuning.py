"""ghostkernels.tune: the backend choice measured per call shape (ghostkernels/tuning.py), on the
CPU backends (C++ and reference; the mechanism is the same on a GPU, with more candidates). The
Triton interpreter, a candidate on CPU tensors under TRITON_INTERPRET=1, is left out (slow)."""
import time

import pytest
import torch

import ghostkernels
from ghostkernels import backends, tuning
from tests.backend_params import require

CPU = ("reference", "cpu", "cuda")  # cuda: a candidate that cannot run CPU tensors


@pytest.fixture(autouse=True)
def _no_tuning_left_over(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    tuning.clear()
    yield
    tuning.clear()


def ghost_args(B=2, Cin=8, C1=6, H=9, W=7):
    x = torch.randn(B, Cin, H, W).to(memory_format=torch.channels_last)
    return (x, torch.randn(C1, Cin, 1, 1) / Cin ** 0.5, torch.randn(C1), torch.randn(C1, 1, 3, 3),
            torch.randn(C1))


def ghost(args, out_channels=12):
    return ghostkernels.ghost_conv(*args, "relu", "relu", out_channels)


class CountingForward:
    """Wraps a backend module's forward, counting its calls."""

    def __init__(self, monkeypatch, op, backend):
        self.module = backends.implementations(op)[backend].load()
        self.inner, self.calls = self.module.forward, 0
        monkeypatch.setattr(self.module, "forward", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def fake_times(monkeypatch, ms_by_backend):
    """Make _time_ms report fixed times per backend (the module whose forward is timed)."""
    def fake(call, device_type, repeats, warmup):
        module = call.__defaults__[0]
        for backend, ms in ms_by_backend.items():
            if backends.implementations("ghost_conv")[backend].load() is module:
                return ms
        return 99.0
    monkeypatch.setattr(tuning, "_time_ms", fake)


def test_the_measured_winner_runs_that_shape_only(monkeypatch):
    require("cpu", "ghost_conv", torch.float32)
    args, other = ghost_args(), ghost_args(H=5)
    assert backends.select("ghost_conv", torch.device("cpu"), torch.float32) == "cpu"
    fake_times(monkeypatch, {"cpu": 2.0, "reference": 1.0})
    (entry,) = ghostkernels.tune(ghost, args, candidates=CPU)
    assert (entry.op, entry.backend, entry.ms) == ("ghost_conv", "reference",
                                                   {"cpu": 2.0, "reference": 1.0})
    # "runs CUDA tensors only", or "built without CUDA" for a CPU-only build of the extension
    assert backends.availability("cuda", "cpu").reason in entry.rejected["cuda"]
    cpu = CountingForward(monkeypatch, "ghost_conv", "cpu")
    reference = CountingForward(monkeypatch, "ghost_conv", "reference")
    tuned_out = ghost(args)
    assert (reference.calls, cpu.calls) == (1, 0)
    ghost(other)  # another shape: the automatic order
    assert (reference.calls, cpu.calls) == (1, 1)
    ghost(args, out_channels=11)  # another non-tensor argument: another call shape
    assert (reference.calls, cpu.calls) == (1, 2)
    with ghostkernels.use_backend("cpu"):  # forcing still wins
        forced_out = ghost(args)
    assert (reference.calls, cpu.calls) == (1, 3)
    torch.testing.assert_close(tuned_out, forced_out, rtol=1e-5, atol=1e-5)
    tuning.clear()
    ghost(args)
    assert (reference.calls, cpu.calls) == (1, 4)


def test_a_backend_that_disagrees_with_the_reference_is_not_installed(monkeypatch):
    require("cpu", "ghost_conv", torch.float32)
    cpu = backends.implementations("ghost_conv")["cpu"].load()
    inner = cpu.forward
    monkeypatch.setattr(cpu, "forward", lambda *a, **k: inner(*a, **k) * 1.01)
    fake_times(monkeypatch, {"cpu": 1.0, "reference": 2.0})  # the wrong one is "faster"
    (entry,) = ghostkernels.tune(ghost, ghost_args(), candidates=CPU)
    assert entry.backend == "reference"
    assert "disagrees with the reference" in entry.rejected["cpu"]


def test_a_failing_backend_is_reported_not_fatal(monkeypatch):
    require("cpu", "ghost_conv", torch.float32)
    cpu = backends.implementations("ghost_conv")["cpu"].load()

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(cpu, "forward", broken)
    # the recording run uses the automatic order: the reference first, so that it succeeds
    monkeypatch.setitem(backends._OP_AUTO_ORDER, ("ghost_conv", "cpu"), ("reference", "cpu"))
    (entry,) = ghostkernels.tune(ghost, ghost_args(), candidates=CPU)
    assert entry.backend == "reference" and "kernel exploded" in entry.rejected["cpu"]


def test_every_op_shape_of_a_folded_backbone_is_tuned_and_outputs_stay(monkeypatch):
    require("cpu", "ghost_conv", torch.float32)
    from rtdetr.models.backbone.ghostnetv3 import GhostNetV3
    torch.manual_seed(0)
    net = GhostNetV3(width=0.5).eval()
    net.reparameterize(use_fused_ops=True)
    x = torch.randn(1, 3, 64, 96).to(memory_format=torch.channels_last)
    with torch.no_grad():
        before = net(x)
    entries = ghostkernels.tune(net, x, candidates=CPU, repeats=2, warmup=1)
    ops = {e.op for e in entries}
    assert {"ghost_conv", "depthwise_conv"} <= ops, ops
    assert all(e.backend in e.ms and e.ms[e.backend] == min(e.ms.values()) for e in entries)
    assert len(backends._TUNED) == len({(e.op, e.dtype, e.key) for e in entries})
    with torch.no_grad():
        after = net(x)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tune_refuses_unknown_backends_and_nesting():
    with pytest.raises(ValueError, match="candidates must be among"):
        ghostkernels.tune(lambda: None, candidates=("fast",))
    with pytest.raises(RuntimeError, match="already recording"):
        ghostkernels.tune(lambda: ghostkernels.tune(lambda: None))


def test_concurrent_tunes_record_only_their_own_threads_calls():
    """The recorder is per thread: a tune() records the calls its own thread makes, not those
    of other threads, and two threads can tune at the same time (a module-global recorder
    recorded every thread's calls and refused the second tune as nested)."""
    import threading
    a_args, b_args, other_args = ghost_args(H=5), ghost_args(H=6), ghost_args(H=7)
    a_recording, b_done = threading.Event(), threading.Event()
    results, errors = {}, []

    def fn_a():
        ghost(a_args)
        a_recording.set()
        assert b_done.wait(60)  # B's plain call and B's whole tune happen while A records

    def thread_a():
        try:
            results["a"] = ghostkernels.tune(fn_a, candidates=CPU, repeats=1, warmup=0)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def thread_b():
        try:
            assert a_recording.wait(60)
            ghost(other_args)  # an untuned call on another thread
            results["b"] = ghostkernels.tune(ghost, b_args, candidates=CPU, repeats=1, warmup=0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)

    def heights(entries):  # key[0]: x's shape, with its layout for channels_last
        return [e.key[0][0][2] if isinstance(e.key[0][0], tuple) else e.key[0][2]
                for e in entries]

    assert heights(results["a"]) == [5] and heights(results["b"]) == [6]
    assert all(e.backend for e in results["a"] + results["b"])
    assert len(backends._TUNED) == 2


def test_the_triton_interpreter_is_never_timed():
    (entry,) = ghostkernels.tune(ghost, ghost_args())
    assert "triton" not in entry.ms and "triton" in entry.rejected
    if backends.triton_interpret():
        assert "correctness tool" in entry.rejected["triton"]


def test_saved_choices_load_in_another_process_on_the_same_device(tmp_path):
    args = ghost_args()
    ghostkernels.tune(ghost, args, candidates=CPU)
    ghostkernels.tune(lambda: ghostkernels.depthwise_conv(args[0], torch.randn(8, 1, 3, 3),
                                                          torch.randn(8), 2, "relu"),
                      candidates=CPU)
    installed = dict(backends._TUNED)
    assert len(installed) == 2
    path = tmp_path / "tuning.json"
    assert tuning.save(path) == 2
    tuning.clear()
    assert tuning.load(path) == 2
    assert backends._TUNED == installed  # keys come back as the same tuples and dtypes


def test_loading_refuses_another_device_and_corrupt_files(tmp_path):
    import json
    ghostkernels.tune(ghost, ghost_args(), candidates=CPU)
    path = tmp_path / "tuning.json"
    tuning.save(path)
    data = json.loads(path.read_text())
    data["entries"][0]["device"] = "some other card"
    path.write_text(json.dumps(data))
    tuning.clear()
    with pytest.raises(ValueError, match="measured on 'some other card'"):
        tuning.load(path)
    assert not backends._TUNED
    assert tuning.load(path, any_device=True) == 1
    for text in ("{", '{"format": "other"}', '{"format": "ghostkernels-tuning-1", "entries": '
                 '[{"op": "ghost_conv", "device_type": "cpu", "device": "x", "dtype": "nn", '
                 '"key": [], "backend": "cpu"}]}'):
        path.write_text(text)
        with pytest.raises(ValueError, match="not a ghostkernels tuning file"):
            tuning.load(path, any_device=True)
    with pytest.raises(ValueError, match="not a ghostkernels tuning file"):
        tuning.load(tmp_path / "missing.json")
    data["entries"][0]["backend"] = "fastest"
    path.write_text(json.dumps(data))
    tuning.clear()
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        tuning.load(path, any_device=True)
    assert not backends._TUNED


def test_tuned_for_scopes_the_choices_and_summary_counts_them(monkeypatch):
    require("cpu", "ghost_conv", torch.float32)
    fake_times(monkeypatch, {"cpu": 2.0, "reference": 1.0})
    args = ghost_args()
    ghostkernels.tune(ghost, ghost_args(H=5), candidates=CPU)  # installed before the block
    before = dict(backends._TUNED)
    with tuning.tuned_for(ghost, args, candidates=CPU) as entries:
        assert [e.backend for e in entries] == ["reference"]
        assert len(backends._TUNED) == 1 and backends._TUNED != before  # only the block's
        assert tuning.summary(entries + entries) == "ghost_conv=reference x2"
    assert backends._TUNED == before


@pytest.mark.gpu
def test_gpu_times_are_graph_replays_and_uncapturable_calls_fall_back():
    """On a GPU a call is timed as CUDA-graph replays (no host launch gaps): a call of many
    tiny kernels costs about its kernels, far less than its eager wall time; a call that
    synchronises with the host cannot be captured and is timed eagerly."""
    x = torch.randn(64, device="cuda")

    def many_small_kernels():
        y = x
        for _ in range(50):
            y = y + 1
        return y

    graphed = tuning._time_ms(many_small_kernels, "cuda", repeats=20, warmup=2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        many_small_kernels()
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) * 1e3 / 20
    assert 0 < graphed < eager
    assert tuning._captured(lambda: x.sum().item()) is None
    assert tuning._time_ms(lambda: x.sum().item(), "cuda", repeats=3, warmup=1) > 0


def test_bad_repeats_or_warmup_are_refused_before_running_anything():
    ran = []
    for kwargs, name in (({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
                         ({"repeats": 2.5}, "repeats"), ({"warmup": True}, "warmup")):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            ghostkernels.tune(lambda: ran.append(1), **kwargs)
    assert ran == []
    from ghostkernels.benchmark import cuda_graph_replay
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got -1"):
        cuda_graph_replay(lambda: None, warmup=-1)


def test_a_file_with_an_unusable_key_is_refused_before_any_choice_is_installed(tmp_path):
    import json
    ghostkernels.tune(ghost, ghost_args(), candidates=CPU)
    ghostkernels.tune(ghost, ghost_args(H=5), candidates=CPU)
    path = tmp_path / "tuning.json"
    assert tuning.save(path) == 2
    data = json.loads(path.read_text())
    data["entries"][1]["key"] = {"not": "a key"}  # a JSON object: unhashable once loaded
    path.write_text(json.dumps(data))
    tuning.clear()
    with pytest.raises(ValueError, match="not a ghostkernels tuning file"):
        tuning.load(path)
    assert not backends._TUNED  # all checked before any is used


def test_save_snapshots_the_choices_another_thread_may_be_installing(tmp_path, monkeypatch):
    """tune() in another thread installs choices while save() writes them out: save writes
    the choices installed when it started, it does not fail with 'dictionary changed size'."""
    ghostkernels.tune(ghost, ghost_args(), candidates=CPU)
    ghostkernels.tune(ghost, ghost_args(H=5), candidates=CPU)
    name = tuning._device_name

    def device_name_while_another_thread_installs(device_type):
        backends.install_tuned("ghost_conv", "cpu", torch.float64, (len(backends._TUNED),),
                               "reference")
        return name(device_type)

    monkeypatch.setattr(tuning, "_device_name", device_name_while_another_thread_installs)
    path = tmp_path / "tuning.json"
    assert tuning.save(path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["tuning.json"]  # no temporary file left


def test_a_cpu_tuning_file_names_the_cpu_model(monkeypatch, tmp_path):
    """The CPU 'device' was platform.processor(): 'x86_64' on every x86 machine, so a file
    tuned on another CPU model loaded as if measured here. It is the model name on Linux."""
    import json
    import os
    if not os.path.isfile("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo: the model name is read on Linux only")
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if not models:
        pytest.skip("/proc/cpuinfo lists no model name on this architecture")
    ghostkernels.tune(ghost, ghost_args(), candidates=CPU)
    path = tmp_path / "tuning.json"
    tuning.save(path)
    assert {e["device"] for e in json.loads(path.read_text())["entries"]} == {models[0]}
