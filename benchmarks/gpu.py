"""Train and score events/s on a device: salka's own functions against a plain PyTorch loop.

Run: python benchmarks/gpu.py [--device auto|cpu|cuda] [--precision bf16|fp32] [--batch 4096]
                              [--events 131072] [--width 128] [--explain] [--small]
Models: char-LSTM d128 (1 layer) and GPT d128x2 (4 heads), on char-tokenized synthetic LANL
events (pipeline.generate). For each model, side by side in one process on the same batches:
- salka: nn.training.train_sequences (batches padded on the host, one transfer each) and
  nn.scoring.score_sequences (batches laid out on the device from the packed ids and lengths,
  per-event results back as Python floats), as the trainer and scorers run:
  means and totals only; --explain also brings back the per-token losses (scores.explain: true);
- plain: the reference loop: batches padded and moved to the device before the clock starts,
  then forward (autocast) / backward / clip / AdamW step, or forward + masked per-event loss sums.
The ratio salka / plain shows what salka's own work costs; issue 13's goal is >= 0.8x of its
reference figures (a plain loop on an H200: LSTM 444k train / 2.05M score, GPT 177k / 469k events/s).
The plain loop also scores batches cut in length order (less padding; on an H200 that loop comes
nearest the reference's LSTM figure: 1.60M-1.80M against 1.15M-1.26M in input order).
--small: tiny sizes (d16 models, batch 64, 512 events) so it runs in seconds on a CPU.
--variants: also scores with other forward passes (autocast around the whole loop, a bf16 copy of
the model, CUDA graphs replayed per batch shape) and batch orders, for the next step on the
LSTM's scoring (README, Devices).
Say which card gave a figure: the first line prints the device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from nn.device import autocast, resolve_device  # noqa: E402
from nn.scoring import _collect, by_length, in_input_order, pad_batch, score_sequences, token_losses  # noqa: E402
from nn.tokenizers import BOS, PAD, encode_event  # noqa: E402
from nn.training import build_model, make_optimizer, train_sequences  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.generate import GenerateSpec, write_log  # noqa: E402
from pipeline.modelspec import make_tokenizer  # noqa: E402
from pipeline.replay import parse_file  # noqa: E402

MAX_TOKENS = 120


def model_args(kind: str, width: int, vocab_size: int) -> dict:
    if kind == "lstm":
        return {"kind": "rnn", "vocab_size": vocab_size, "cell": "lstm", "hidden_size": width, "n_layer": 1}
    return {"kind": "gpt", "vocab_size": vocab_size, "block_size": MAX_TOKENS + 2,
            "n_layer": 2, "n_head": 4 if width % 4 == 0 else 1, "n_embd": width}


def char_events(count: int) -> tuple[list[list[int]], int]:
    """``count`` encoded LANL-style events (BOS .. EOS, char ids) and the vocabulary size."""
    config = config_from_dict({"tokenizer": {"kind": "char", "max_tokens": MAX_TOKENS}})
    with tempfile.TemporaryDirectory() as folder:
        log, labels = Path(folder) / "auth.csv", Path(folder) / "labels.csv"
        days = max(1, -(-count // 20_000))
        write_log(GenerateSpec(days=days, events_per_day=min(count, 20_000) + 500, seed=11), log, labels)
        windows, _ = parse_file(log, config)
    tokenizer = make_tokenizer(config)
    events = [e for index in sorted(windows) for e in windows[index]][:count]
    seqs = [encode_event(tokenizer, e.text_fields, MAX_TOKENS) for e in events]
    while len(seqs) < count:  # a short log repeats (only the timing matters here)
        seqs += seqs[: count - len(seqs)]
    return seqs, tokenizer.vocab_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work) -> float:
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


def fresh(args: dict, device: torch.device):
    torch.manual_seed(0)
    model = build_model(args).to(device)
    return model, make_optimizer(model, 3e-3, 0.0)


def salka_rates(args, seqs, batch, device, precision, per_token=False) -> tuple[float, float, float]:
    """Train, score (second pass) and score (first pass) events/s. The first pass meets each
    batch width for the first time (length-ordered batches: one width a batch), and every new
    width costs the GPU libraries a set-up; a running scorer has met them all within minutes."""
    model, optimizer = fresh(args, device)
    train_sequences(model, optimizer, seqs[:batch], epochs=1, batch_size=batch, grad_clip=1.0,
                    seed=0, device=device, precision=precision)  # warm-up (kernels, allocator)
    train_s = timed(device, lambda: train_sequences(
        model, optimizer, seqs, epochs=1, batch_size=batch, grad_clip=1.0, seed=1,
        device=device, precision=precision))

    def score() -> None:
        score_sequences(model, seqs, batch, device=device, precision=precision, per_token=per_token)

    score_sequences(model, seqs[:batch], batch, device=device, precision=precision, per_token=per_token)
    first_s = timed(device, score)
    score_s = timed(device, score)
    return len(seqs) / train_s, len(seqs) / score_s, len(seqs) / first_s


def plain_rates(args, seqs, batch, device, precision) -> tuple[float, float, float]:
    """The reference: the same model, batch order and padding, with the batches on the device
    before timing starts and nothing but the framework's own loop inside the timing."""
    model, optimizer = fresh(args, device)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [pad_batch([seqs[i] for i in order[s : s + batch]]).to(device)
                for s in range(0, len(seqs), batch)]
    in_order = [pad_batch(seqs[s : s + batch]).to(device) for s in range(0, len(seqs), batch)]
    shortest_first = sorted(seqs, key=len)  # less padding: what the reference figure matches
    by_length = [pad_batch(shortest_first[s : s + batch]).to(device) for s in range(0, len(seqs), batch)]

    def train(batches) -> None:
        model.train()
        for seq in batches:
            idx, targets = model.inputs_and_targets(seq)
            with autocast(device, precision):
                _, loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    @torch.no_grad()
    def score(batches) -> None:
        model.eval()
        for seq in batches:
            idx, targets = model.inputs_and_targets(seq)
            with autocast(device, precision):
                logits, _ = model(idx)
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                                     reduction="none").view(targets.shape)
            mask = targets != -1
            (losses * mask).sum(1).cpu(), mask.sum(1).cpu()  # per-event totals reach the host

    train(shuffled[:1])
    train_s = timed(device, lambda: train(shuffled))
    score(in_order[:1])
    score_s = timed(device, lambda: score(in_order))
    score(by_length)  # every batch width met once: each new one costs the GPU libraries a set-up
    by_length_s = timed(device, lambda: score(by_length))
    return len(seqs) / train_s, len(seqs) / score_s, len(seqs) / by_length_s


class GraphedScorer:
    """``--variants``' CUDA-graph scoring: the forward pass, the masked losses and the per-event
    sums captured once per batch shape (B, T) and replayed, one launch a batch: none of the host
    work of launching ~40 kernels, autocast's casts and cuDNN's set-up per call, which a profile
    puts above the GPU's own time for the LSTM (README, Devices). Batches are padded on the host
    into pinned memory and copied into the graph's input; the per-event sums come back as in
    nn/scoring.py. Every shape met costs a capture (and the memory of one forward pass)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str):
        self.model, self.device, self.precision = model, device, precision
        self.graphs: dict[tuple[int, int], tuple] = {}

    def _sums(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, mask = token_losses(self.model, batch, self.precision)
        return (losses * mask).sum(1), mask.sum(1)

    def _graph(self, shape: tuple[int, int]) -> tuple:
        if shape not in self.graphs:
            static = torch.full(shape, 0, dtype=torch.long, device=self.device)
            static[:, 0] = BOS  # a valid batch for the warm-up; its contents do not matter
            side = torch.cuda.Stream(self.device)  # warm-up off the default stream (torch's recipe)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._sums(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sums = self._sums(static)
            self.graphs[shape] = (graph, static, sums)
        return self.graphs[shape]

    @torch.no_grad()
    def means(self, seqs, batch: int, length_order: bool = False, bucket: int = 1) -> list[float]:
        """Mean loss per sequence, in input order. ``length_order``: batches cut shortest first
        (less padding: what the plain loop's length-order figure gets); ``bucket``: each batch
        padded to a multiple of it, so that few shapes (graphs) cover every width (padding past
        a row's end changes none of its losses: both models read left to right)."""
        self.model.eval()
        order = by_length(seqs) if length_order else None  # None: already in that order
        rows = [seqs[i] for i in order] if order is not None else seqs
        results: list[float] = []
        pending = None
        for start in range(0, len(rows), batch):
            ids = pad_batch(rows[start : start + batch], pin_memory=True)
            width = -(-ids.shape[1] // bucket) * bucket
            if width != ids.shape[1]:
                wider = torch.full((ids.shape[0], width), PAD, dtype=ids.dtype, pin_memory=True)
                wider[:, : ids.shape[1]] = ids
                ids = wider
            graph, static, sums = self._graph(tuple(ids.shape))
            static.copy_(ids, non_blocking=True)
            graph.replay()
            # Copied out before the next replay overwrites them (the same stream: in order).
            host = [t.to("cpu", non_blocking=True) for t in sums]
            done = torch.cuda.Event()
            done.record()
            if pending is not None:
                results += [mean for mean, _, _ in _collect(pending, per_token=False)]
            pending = host, done
        if pending is not None:
            results += [mean for mean, _, _ in _collect(pending, per_token=False)]
        return results if order is None else in_input_order(results, order)


def forward_variants(args, seqs, batch, device, precision, rounds: int = 3) -> None:
    """``--variants``: salka's scoring with other forward passes, on the same events, alternating,
    to find where the host time per batch goes (an untrained model: the rates do not depend on
    the weights). Each is timed on its second pass; the difference is the largest |mean loss|
    difference from salka's own scores on the first 8 batches.
    - autocast per batch: salka's (nn/scoring.py token_losses);
    - one autocast around the loop: the weights' casts are cached across batches;
    - bf16 copy: the model converted once, no autocast (no casts at all; an RNN keeps cuDNN's
      flat weights);
    each with batches in input order and in length order (set on the model instance, as
    ``gpu_scores_in_length_order``);
    - on a GPU, CUDA graphs (GraphedScorer), with salka's autocast and with the bf16 copy:
      batches in input order (one shape for nearly every batch), and in length order with
      widths rounded up to a multiple of 8 (a few shapes, little padding). A variant that fails
      says why and the others go on."""
    torch.manual_seed(0)
    model = build_model(args).to(device).eval()
    half = copy.deepcopy(model).to(torch.bfloat16)

    def means(net, outer: bool, net_precision: str, length_order: bool, events) -> list[float]:
        net.gpu_scores_in_length_order = length_order
        with autocast(device, precision) if outer else contextlib.nullcontext():
            return [mean for mean, _, _ in score_sequences(net, events, batch, device=device,
                                                           precision=net_precision, per_token=False)]

    # The model's order setting applies on a GPU only: a CPU always cuts batches in length order.
    orders = {"input": False, "length": True} if device.type == "cuda" else {"length": True}
    variants = {}
    for name, variant in {"autocast per batch": (model, False, precision),
                          "one autocast around the loop": (model, True, precision),
                          "bf16 copy, no autocast": (half, False, "fp32")}.items():
        for order, length_order in orders.items():
            variants[f"{name}, {order} order"] = functools.partial(means, *variant, length_order)
    if device.type == "cuda":
        for name, net, net_precision in (("autocast", model, precision), ("bf16 copy", half, "fp32")):
            scorer = GraphedScorer(net, device, net_precision)
            variants[f"CUDA graphs, {name}, input order"] = functools.partial(scorer.means, batch=batch)
            variants[f"CUDA graphs, {name}, length order, width/8"] = functools.partial(
                scorer.means, batch=batch, length_order=True, bucket=8)
    sample = seqs[: 8 * batch]
    reference = variants[f"autocast per batch, {next(iter(orders))} order"](sample)
    best: dict[str, float] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for key, work in variants.items():
            if key in failed:
                continue
            try:
                work(seqs)  # every batch width met once
                best[key] = max(best.get(key, 0.0), len(seqs) / timed(device, functools.partial(work, seqs)))
            except Exception as exc:  # an experiment: say why, go on with the others
                failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    for key, work in variants.items():
        if key in failed:
            print(f"    {key:<45} failed: {failed[key]}")
            continue
        difference = max(abs(a - b) for a, b in zip(reference, work(sample)))
        print(f"    {key:<45} {best[key]:>12.0f} ev/s (best of {rounds}; "
              f"|mean| difference {difference:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--events", type=int, default=131_072)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--explain", action="store_true",
                        help="salka scoring also returns per-token losses (as with scores.explain)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run")
    parser.add_argument("--variants", action="store_true",
                        help="also score with other forward passes and batch orders (forward_variants)")
    opts = parser.parse_args()
    if opts.small:
        opts.batch, opts.events, opts.width = 64, 512, 16
    device = resolve_device(opts.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}, precision {opts.precision}, "
          f"batch {opts.batch}, {opts.events} events, width {opts.width}, "
          f"threads {torch.get_num_threads()}, per-token losses {'on' if opts.explain else 'off'}")
    seqs, vocab_size = char_events(opts.events)
    mean_len = sum(map(len, seqs)) / len(seqs)
    print(f"char events: mean {mean_len:.1f} tokens (BOS/EOS included)")
    print(f"{'model':<12} {'loop':<6} {'train ev/s':>12} {'score ev/s':>12}")
    ratios = []
    for kind in ("lstm", "gpt"):
        label = f"{kind}-d{opts.width}" + ("x2" if kind == "gpt" else "")
        args = model_args(kind, opts.width, vocab_size)
        ours = salka_rates(args, seqs, opts.batch, device, opts.precision, opts.explain)
        plain = plain_rates(args, seqs, opts.batch, device, opts.precision)
        for loop, (train, score) in (("salka", ours[:2]), ("plain", plain[:2])):
            print(f"{label:<12} {loop:<6} {train:>12.0f} {score:>12.0f}")
        if opts.variants:
            print(f"  {label}, scoring with other forward passes:")
            forward_variants(args, seqs, opts.batch, device, opts.precision)
        ratios.append(f"salka/plain {label}: train {ours[0] / plain[0]:.2f}x, "
                      f"score {ours[1] / plain[1]:.2f}x (salka's first scoring pass: {ours[2]:.0f} "
                      f"ev/s; the plain loop scoring batches cut in length order, second pass: "
                      f"{plain[2]:.0f} ev/s)")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
