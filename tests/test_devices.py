"""Devices, precision and threads (issue 13, items 5 and 7): device resolution and its start-up
error, CPU fp32 unchanged, bf16 close to fp32, device-free checkpoints, torch thread settings."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from nn import scoring
from nn.device import autocast, resolve_device, to_cpu
from nn.scoring import pad_batch, pad_batch_on_device, score_sequences
from nn.tokenizers import BOS, EOS
from nn.training import build_model, load_checkpoint, make_optimizer, train_sequences
from pipeline.cli import cli
from pipeline.compute import default_threads, score_batch_size, thread_count, training_device
from pipeline.config import ConfigError, config_from_dict
from pipeline.generate import GenerateSpec, write_log
from pipeline.learner import WindowLearner
from pipeline.parsing import LineParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.rnn.hidden_size=16", "--set", "window.size_seconds=3600",
        "--set", "training.epochs=1"]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory):
    folder = tmp_path_factory.mktemp("devices")
    log, labels = folder / "auth.csv", folder / "labels.csv"
    write_log(GenerateSpec(users=10, computers=30, days=1, events_per_day=400,
                           redteam_events=0, seed=5), log, labels)  # hour windows: ~24
    return log


def _env_without_omp(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **extra}


# ------------------------------------------------------------------ device resolution


def test_auto_is_cuda_only_when_torch_sees_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert training_device(config_from_dict({}).training).type == expected  # auto is the default
    assert resolve_device("cpu") == torch.device("cpu")


@needs_no_gpu
def test_cuda_without_a_gpu_is_a_config_error_naming_the_key():
    config = config_from_dict({"training": {"device": "cuda"}})  # valid config, absent device
    with pytest.raises(ConfigError, match=r"^training\.device: cuda requested but .*set "
                                          r"training\.device to cpu or auto"):
        training_device(config.training)
    with pytest.raises(ConfigError, match=r"^training\.device"):  # in-process, before any work
        WindowLearner(config)


def test_unknown_device_and_precision_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"training\.device"):
        config_from_dict({"training": {"device": "tpu"}})
    with pytest.raises(ConfigError, match=r"training\.precision"):
        config_from_dict({"training": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"training\.threads"):
        config_from_dict({"training": {"threads": -1}})


@needs_no_gpu
def test_replay_with_cuda_and_no_gpu_fails_in_one_line_before_writing(tiny_log, tmp_path):
    out = tmp_path / "scores.csv.gz"
    result = CliRunner().invoke(cli, ["replay", "--input", str(tiny_log), "--output", str(out),
                                      "--set", "training.device=cuda"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: training.device: cuda requested")
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow
@needs_no_gpu
@pytest.mark.parametrize("stage", ["trainer", "scorer"])
def test_model_stage_with_cuda_and_no_gpu_fails_at_start_up(stage):
    """Before the runner: no broker is contacted (none listens on port 9), it fails at once."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", stage, "--set", "training.device=cuda",
         "--set", "kafka.bootstrap\\.servers=127.0.0.1:9"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=_env_without_omp(OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: training.device: cuda requested")
    assert "Traceback" not in proc.stderr


def test_big_scoring_batches_only_on_a_gpu():
    training = config_from_dict({}).training
    assert score_batch_size(training, torch.device("cpu")) == training.score_batch_size == 256
    assert score_batch_size(training, torch.device("cuda")) == training.score_batch_size_gpu == 4096


# ------------------------------------------------------------------ precision


@needs_no_gpu  # the default device is auto: a GPU where there is one (compared below)
def test_cpu_fp32_replay_is_bit_identical_to_the_default_path(tiny_log, tmp_path):
    default, explicit = tmp_path / "default.csv.gz", tmp_path / "cpu.csv.gz"
    for out, extra in ((default, []), (explicit, ["--set", "training.device=cpu",
                                                  "--set", "training.precision=fp32"])):
        result = CliRunner().invoke(cli, ["replay", "--input", str(tiny_log), "--output", str(out),
                                          *TINY, *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    a, b = gzip.decompress(default.read_bytes()), gzip.decompress(explicit.read_bytes())
    assert a.count(b"\n") > 300 and a == b


def _replay_losses(log, out, *extra: str) -> list[str]:
    result = CliRunner().invoke(cli, ["replay", "--input", str(log), "--output", str(out), *TINY, *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with gzip.open(out, "rt", newline="") as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


@needs_gpu
def test_cuda_fp32_replay_is_within_1e_4_of_cpu(tiny_log, tmp_path):
    cpu = _replay_losses(tiny_log, tmp_path / "cpu.csv.gz", "--set", "training.device=cpu")
    gpu = _replay_losses(tiny_log, tmp_path / "cuda.csv.gz", "--set", "training.device=cuda",
                         "--set", "training.precision=fp32")
    assert len(cpu) == len(gpu) > 300
    assert [a == "" for a in cpu] == [b == "" for b in gpu]  # the first window: no model, no loss
    pairs = [(float(a), float(b)) for a, b in zip(cpu, gpu) if a]
    assert len(pairs) > 300 and max(abs(a - b) for a, b in pairs) < 1e-4


@needs_gpu
@pytest.mark.parametrize("kind", ["rnn", "gpt"])
def test_cuda_batches_score_and_train_like_the_cpu(kind):
    """The GPU path (pinned batches, asynchronous read-back one batch behind) keeps the order
    and the values: per-token losses and means against the CPU's, several batches deep."""
    args = {"kind": kind, "vocab_size": 32, **({"hidden_size": 16} if kind == "rnn" else
                                                {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 12})}
    seqs = _sequences()
    torch.manual_seed(0)
    model = build_model(args)
    cpu = score_sequences(model, seqs, 16, device=torch.device("cpu"))
    model.to("cuda")
    gpu = score_sequences(model, seqs, 16, device=torch.device("cuda"))
    gpu_means = score_sequences(model, seqs, 16, device=torch.device("cuda"), per_token=False)
    for (m0, t0, p0), (m1, t1, p1), (m2, t2, p2) in zip(cpu, gpu, gpu_means):
        assert (m1, t1) == (m2, t2) and p2 == () and len(p0) == len(p1)
        assert abs(m0 - m1) < 1e-5 and abs(t0 - t1) < 1e-4
        assert max(abs(a - b) for a, b in zip(p0, p1)) < 1e-5
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model(args).to(device)
        optimizer = make_optimizer(model, 3e-3, 0.0)
        results[device] = train_sequences(model, optimizer, seqs, epochs=2, batch_size=16, grad_clip=1.0,
                                          seed=1, device=torch.device(device))
    assert results["cuda"] == pytest.approx(results["cpu"], abs=1e-4)


@needs_gpu
def test_cuda_training_skips_the_same_empty_batches_as_the_cpu():
    """Batches with nothing to predict (BOS EOS rows for a bidirectional model) are skipped on
    the GPU as on the CPU, with the next batch padded ahead: same batches, same mean loss."""
    args = {"kind": "rnn", "vocab_size": 32, "hidden_size": 16, "bidirectional": True}
    seqs = [seq if i % 2 else [BOS, EOS] for i, seq in enumerate(_sequences(48))]
    results, progress = {}, {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model(args).to(device)
        optimizer = make_optimizer(model, 3e-3, 0.0)
        progress[device] = []
        results[device] = train_sequences(
            model, optimizer, seqs, epochs=2, batch_size=2, grad_clip=1.0, seed=1,
            device=torch.device(device), on_batch=lambda *step, seen=progress[device]: seen.append(step))
    assert results["cuda"] == pytest.approx(results["cpu"], abs=1e-4)
    assert progress["cuda"] == progress["cpu"] and len(progress["cpu"]) == 2 * 24
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1)).tolist()
    assert any(order[i] % 2 == order[i + 1] % 2 == 0 for i in range(0, 48, 2))  # control: a skip


def _sequences(n: int = 96) -> list[list[int]]:
    """Events with structure a model can learn: a few fixed patterns plus a varying field."""
    g = torch.Generator().manual_seed(0)
    patterns = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    return [[1, *patterns[i % 3], 20 + int(torch.randint(0, 8, (1,), generator=g)), 2] for i in range(n)]


@pytest.mark.parametrize("kind", ["rnn", "gpt"])
def test_bf16_on_cpu_trains_and_scores_close_to_fp32(kind):
    args = {"kind": kind, "vocab_size": 32, **({"hidden_size": 16} if kind == "rnn" else
                                                {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 12})}
    seqs = _sequences()
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(args)
        optimizer = make_optimizer(model, 3e-3, 0.0)
        loss = train_sequences(model, optimizer, seqs, epochs=3, batch_size=16, grad_clip=1.0,
                               seed=1, device=torch.device("cpu"), precision=precision)
        scores = score_sequences(model, seqs, 32, device=torch.device("cpu"), precision=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        results[precision] = (loss, [mean for mean, _, _ in scores])
    (loss32, s32), (loss16, s16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=0.05)
    assert max(abs(a - b) for a, b in zip(s32, s16)) < 0.15
    assert s32 != s16  # bf16 really ran: the numbers are close, not the same


def test_autocast_is_nothing_for_fp32_and_bf16_for_bf16():
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_from_the_training_device_resumes_on_cpu(tmp_path):
    """Trained on this machine's device (a GPU where there is one), loaded with device cpu."""
    parser = LineParser(config_from_dict({}).input)
    lines = [f"{3600 * (i // 40) + i},U{i % 7}@DOM1,U{i % 7}@DOM1,C{i % 5},C{i % 3},Kerberos,"
             f"Network,LogOn,Success" for i in range(80)]
    events = [parser.parse(line, n + 1) for n, line in enumerate(lines)]
    windows = [events[:40], events[40:]]
    data = {"model": {"rnn": {"hidden_size": 16}}, "training": {"epochs": 1}}
    learner = WindowLearner(config_from_dict({**data, "training": {"epochs": 1, "device": "auto"}}))
    learner.train(0, windows[0])
    path = tmp_path / "checkpoint.pt"
    learner.save(path)

    saved = torch.load(path, weights_only=True)  # no map_location: the file itself is CPU-only
    tensors = [*saved["model"].values(), *(v for s in saved["optimizer"]["state"].values()
                                           for v in s.values() if isinstance(v, torch.Tensor))]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert load_checkpoint(path)["last_window"] == 0

    resumed = WindowLearner.load(path, config_from_dict({**data, "training": {"epochs": 1, "device": "cpu"}}))
    assert all(p.device.type == "cpu" for p in resumed.model.parameters())
    here = [s.loss for s in learner.score(1, windows[1])]
    there = [s.loss for s in resumed.score(1, windows[1])]
    assert max(abs(a - b) for a, b in zip(here, there)) < 1e-5
    # the optimizer state came along: one more step is the same on both sides
    assert resumed.train(1, windows[1]) == pytest.approx(learner.train(1, windows[1]), abs=1e-5)


def test_to_cpu_keeps_cpu_tensors_and_shared_memory():
    w = torch.ones(3)
    state = {"a": w, "b": [w.detach(), (1, "x")], "n": 3}
    out = to_cpu(state)
    assert out["a"] is w and out["b"][0].data_ptr() == w.data_ptr() and out["b"][1] == (1, "x")


# ------------------------------------------------------------------ threads


def test_thread_policy():
    # One thread by default, whatever the host's load: results never depend on the moment.
    assert default_threads("stage") == 1
    assert default_threads("replay") == 1
    assert thread_count(3, "stage", {}) == (3, "training.threads")
    assert thread_count(3, "stage", {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert thread_count(0, "stage", {"OMP_NUM_THREADS": "junk"})[0] == 1
    for odd in ("\u00b2", "9" * 5000):  # digits to str.isdigit(), not to int()
        assert thread_count(0, "stage", {"OMP_NUM_THREADS": odd})[0] == 1


PROBE = """
import json, sys, torch
from pipeline.compute import configure_threads
torch.ones(64, 64) @ torch.ones(64, 64)  # torch has worked already: inter-op may be fixed
configure_threads(int(sys.argv[1]), sys.argv[2])
configure_threads(int(sys.argv[1]), sys.argv[2])  # a second call does not fail
print(json.dumps([torch.get_num_threads(), torch.get_num_interop_threads()]))
"""


def test_threads_are_applied_in_process():
    from pipeline.compute import configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(2, "stage", {}) == 2 and torch.get_num_threads() == 2
        assert configure_threads(0, "stage", {}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize(("requested", "role", "omp", "expected"), [
    (3, "stage", None, [3, 3]),
    (0, "stage", None, [1, 1]),
    (3, "replay", "2", [2, 2]),  # OMP_NUM_THREADS wins
])
def test_threads_are_applied_in_a_fresh_process(requested, role, omp, expected):
    env = _env_without_omp(**({"OMP_NUM_THREADS": omp} if omp else {}))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(requested), role], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow
def test_replay_applies_training_threads(tiny_log, tmp_path):
    code = ("import sys, torch; from pipeline.cli import cli; "
            "cli.main(sys.argv[1:], standalone_mode=False); "
            "print('threads', torch.get_num_threads(), torch.get_num_interop_threads())")
    proc = subprocess.run(
        [sys.executable, "-c", code, "-q", "replay", "--input", str(tiny_log), "--output",
         str(tmp_path / "s.csv.gz"), *TINY, "--set", "training.threads=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env_without_omp())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "threads 3 3"


def test_a_trainer_whose_model_store_cannot_be_written_stops_at_start_up(tmp_path):
    """Not when its first window closes (a day later, by default): before the broker is asked
    (none listens on port 9)."""
    not_a_directory = tmp_path / "auth.csv"
    not_a_directory.write_text("a file\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "trainer", "--metrics-port", "0",
         "--set", f"streaming.model_store={not_a_directory}/models",
         "--set", f"streaming.state_dir={tmp_path / 'state'}",
         "--set", "kafka.bootstrap.servers=127.0.0.1:9"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env_without_omp(OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert line == (f"Error: streaming.model_store: cannot write models to {not_a_directory}/models "
                    f"(Not a directory): set it to a directory the trainer can write, which the "
                    f"scorers can read")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["trainer", "scorer"])
def test_model_stages_apply_training_threads_before_they_run(stage):
    """`pipeline run trainer|scorer` sizes torch's pools at start-up: the runner (replaced here
    by a probe, so that no broker is needed) finds them set."""
    code = ("import sys, torch, pipeline.runner\n"
            "class Probe:\n"
            "    def __init__(self, *args, **kwargs): pass\n"
            "    def run(self):\n"
            "        print('threads', torch.get_num_threads(), torch.get_num_interop_threads())\n"
            "        return 0\n"
            "pipeline.runner.StageRunner = Probe\n"
            "from pipeline.cli import cli\n"
            "cli.main(sys.argv[1:], standalone_mode=False)\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, "-q", "run", stage, "--metrics-port", "0",
         "--set", "training.threads=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env_without_omp())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "threads 3 3"


# ------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_cpu_when_small():
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--small", "--device", "cpu", "--variants"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env_without_omp(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("lstm", "gpt"))]
    assert len(rows) == 4, proc.stdout  # (lstm, gpt) x (salka, plain)
    for row in rows:
        train, score = (float(x) for x in row.split()[-2:])
        assert train > 0 and score > 0
    # --variants: three forward passes a model (a CPU has one batch order), each close to salka's
    variants = [line for line in proc.stdout.splitlines() if "|mean| difference" in line]
    assert len(variants) == 6, proc.stdout
    for line in variants:
        assert float(line.split("difference")[1].strip(" )")) < 1e-2, line


@needs_gpu
@pytest.mark.parametrize("kind", ["rnn", "gpt"])
def test_the_cuda_graph_variant_scores_as_salka(kind):
    """benchmarks/gpu.py --variants' GraphedScorer (an experiment for the LSTM's scoring): its
    means are salka's, on the capturing pass and on the replaying one."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu import GraphedScorer

    torch.manual_seed(0)
    args = ({"kind": "rnn", "vocab_size": 40, "hidden_size": 16} if kind == "rnn" else
            {"kind": "gpt", "vocab_size": 40, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16})
    model = build_model(args).to("cuda").eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [[BOS, *torch.randint(4, 40, (int(n),), generator=gen).tolist(), EOS]
            for n in torch.randint(1, 20, (200,), generator=gen)]
    expected = [mean for mean, _, _ in score_sequences(model, seqs, 64, device=torch.device("cuda"),
                                                      precision="fp32", per_token=False)]
    scorer = GraphedScorer(model, torch.device("cuda"), "fp32")
    for _ in range(2):
        assert scorer.means(seqs, 64) == pytest.approx(expected, abs=1e-5)
        assert scorer.means(seqs, 64, length_order=True, bucket=8) == pytest.approx(expected, abs=1e-5)


@needs_gpu
def test_fp32_on_cuda_turns_tf32_off():
    """TF32 (cuDNN's default for the LSTM) made scorer losses differ from replay's by more than
    1e-5 depending on batching (seen on an H200); fp32 must mean fp32."""
    torch.backends.cudnn.allow_tf32 = True
    training_device(config_from_dict({"training": {"device": "cuda", "precision": "fp32"}}).training)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_padding_on_the_device_gives_the_host_batch(device):
    """pad_batch_on_device (the GPU scoring path) lays the ids out as pad_batch does, for every
    kind of row: bytes (packed), lists and tuples, ids past a byte, negative context ids, an
    empty row, one row alone."""
    g = torch.Generator().manual_seed(3)

    def row(kind: str) -> object:
        ids = torch.randint(0, 256, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        return {"bytes": bytes(ids), "list": ids, "tuple": tuple(ids), "wide": [*ids, 300],
                "context": [-7, -8, *ids]}[kind]

    kinds = ["bytes", "list", "tuple", "wide", "context"]
    batches = [[row("bytes") for _ in range(9)], [row("list")], [b"", bytes([BOS, 9, EOS])],
               *([row(kinds[int(torch.randint(0, 5, (1,), generator=g))]) for _ in range(7)]
                 for _ in range(20))]
    for batch in batches:
        expected = pad_batch(batch)
        got = pad_batch_on_device(batch, torch.device(device))
        assert got.device.type == device and got.dtype == expected.dtype
        assert torch.equal(got.cpu(), expected), batch
    assert not torch.equal(pad_batch_on_device([b"\x05\x06", b"\x07"], torch.device(device)).cpu(),
                           pad_batch([b"\x05\x07", b"\x06"]))  # control: the layout matters


@pytest.mark.parametrize(("kind", "length_order"), [("gpt", True), ("rnn", False)])
def test_on_a_gpu_the_model_says_whether_batches_are_cut_in_length_order(monkeypatch, kind, length_order):
    """score_sequences' CUDA branch, driven on the CPU: the batches it lays out (recorded where
    pad_batch_on_device would send them to the GPU) are in length order for a GPT and in input
    order for an RNN (gpu_scores_in_length_order), and the results come back in input order."""
    args = {"kind": kind, "vocab_size": 32, **({"hidden_size": 16} if kind == "rnn" else
                                                {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 12})}
    torch.manual_seed(0)
    model = build_model(args)
    seqs = [[BOS, *range(5, 5 + n), EOS] for n in (7, 1, 5, 0, 3, 2)]
    widths = []

    def on_the_cpu(rows, device):
        widths.append([len(row) for row in rows])
        return pad_batch(rows)

    monkeypatch.setattr(scoring, "pad_batch_on_device", on_the_cpu)
    got = score_sequences(model, seqs, 2, device=torch.device("cuda"), per_token=False)
    lengths = [len(seq) for seq in seqs]
    expected_rows = sorted(lengths) if length_order else lengths
    assert widths == [expected_rows[i : i + 2] for i in range(0, len(seqs), 2)]
    cpu = score_sequences(model, seqs, 2, per_token=False)
    assert [m for m, _, _ in got] == pytest.approx([m for m, _, _ in cpu], abs=1e-6)
