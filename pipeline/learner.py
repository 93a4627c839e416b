"""The train-then-score core shared by ``pipeline replay`` and the streaming trainer.

For each complete window, in order: score its events with the model trained on the earlier
windows, then train on them. Everything that decides a number (event order, batching, seeds) is
a function of the config and the window's events alone, so offline and online runs agree.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from nn.context import event_ids, with_context
from nn.scoring import score_sequences
from nn.tokenizers import (
    BOS,
    EOS,
    WordTokenizer,
    encode_event,
    needs_fit,
    stable_bucket,
    tokenizer_from_state,
)
from nn.training import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_optimizer_state,
    make_optimizer,
    model_args_of,
    save_checkpoint,
    train_sequences,
)
from pipeline.compute import score_batch_size, training_device
from pipeline.config import RENAMED_KEYS, Config, ConfigError, compared_sections, config_to_dict
from pipeline.context import EntityHistory
from pipeline.modelspec import make_tokenizer, model_args_for
from pipeline.parsing import Event
from pipeline.safetext import printable
from pipeline.score import Score
from pipeline.sessions import SessionModel, SessionScore
from pipeline.surprising import SurpriseRanking
from pipeline.windowing import event_order

log = logging.getLogger(__name__)
# Config keys added since checkpoints were first written: a checkpoint without one was made
# before it existed and is compared as if it had the running config's value.
ADDED_KEYS = ("tokenizer.word.grow", "tokenizer.word.grow_reserve")


def _chunk_progress(on_progress: Callable[[int, float, float], None], epochs: int, start: int,
                    size: int, total: int) -> Callable[[int, int, int], None]:
    """A chunk's batch callback, reported as progress through the whole window."""
    def on_batch(epoch: int, done: int, batches: int) -> None:
        part = (epoch + done / batches) / epochs
        on_progress(epoch + 1, done / batches, (start + size * part) / total)
    return on_batch


def sample_key(event: Event, seed: int) -> bytes:
    """A pseudo-random rank from what an event is (time, line, model text), not where Kafka put
    it, so replay and streaming draw the same sample, whatever order the events came in."""
    text = f"{seed}\x1f{event.time!r}\x1f{event.line}\x1f{event.text_fields!r}"
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def sample_mask(keys: Iterable[bytes], total: int, limit: int) -> np.ndarray | None:
    """Which of ``total`` events (given their ``sample_key``s, in order) make the training
    sample: the ``limit`` lowest keys, ties taken in order; None: all of them (no limit, or no
    more events than it). 9 bytes per event, whatever the events hold."""
    if not limit or total <= limit:
        return None
    ranks = np.fromiter((int.from_bytes(k, "big") for k in keys), dtype=np.uint64, count=total)
    order = np.argsort(ranks, kind="stable")[:limit]
    keep = np.zeros(total, dtype=bool)
    keep[order] = True
    return keep


def training_sample(events: list[Event], limit: int, seed: int) -> list[Event]:
    """At most ``limit`` of ``events`` (0: all), the same ones for the same window, kept in the
    order given (the one sample ``WindowLearner.train_ordered`` draws)."""
    keep = sample_mask((sample_key(e, seed) for e in events), len(events), limit)
    return events if keep is None else [e for e, k in zip(events, keep) if k]


def usable_ids(ids: Sequence[int], vocab_size: int, max_tokens: int) -> bool:
    """Whether the ids a tokenizer stage sent with an event are what this model reads: BOS, at
    most ``max_tokens`` ids of its vocabulary, EOS. Anyone who can write to the windows topic
    can send others: an id past the vocabulary crashes the embedding (and so the stage, on every
    restart), a million ids pad a whole batch out of memory."""
    return (2 <= len(ids) <= max_tokens + 2 and ids[0] == BOS and ids[-1] == EOS
            and min(ids) >= 0 and max(ids) < vocab_size)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` items (the last one shorter), read lazily."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def renamed_keys_applied(saved: dict) -> dict:
    """A checkpoint's config with keys renamed since it was written (``RENAMED_KEYS``) under
    their new names, so a checkpoint of an earlier release still resumes."""
    saved = copy.deepcopy(saved)
    for old, new in RENAMED_KEYS.items():
        *parents, old_name = old.split(".")
        node = saved
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and old_name in node:
            node[new.rsplit(".", 1)[1]] = node.pop(old_name)
    return saved


def added_keys_filled(saved: dict, current: dict) -> dict:
    """A checkpoint's config with ``ADDED_KEYS`` it lacks taken from the running config."""
    for key in ADDED_KEYS:
        *parents, name = key.split(".")
        node, now = saved, current
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            now = now.get(part) if isinstance(now, dict) else None
        if isinstance(node, dict) and isinstance(now, dict) and name not in node and name in now:
            node[name] = now[name]
    return saved


_UNSET = object()


def config_differences(saved: object, now: object, where: str) -> list[str]:
    """Each setting that differs, as ``key is X there, Y here``: leaves of nested mappings, and
    of lists of one length item by item (one changed mask pattern, not both whole lists)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [line for key in sorted(saved.keys() | now.keys(), key=str)
                for line in config_differences(saved.get(key, _UNSET), now.get(key, _UNSET),
                                               f"{where}.{key}")]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [line for i, (a, b) in enumerate(zip(saved, now))
                for line in config_differences(a, b, f"{where}[{i}]")]
    return [] if saved == now else [f"{where} is {_shown(saved)} there, {_shown(now)} here"]


def _shown(value: object, limit: int = 80) -> str:
    text = "not set" if value is _UNSET else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 10]}... ({len(text)} characters)"


class WindowLearner:
    """Tokenizer + model + optimizer, advanced one complete window at a time."""

    def __init__(self, config: Config):
        self.config = config
        self.device = training_device(config.training)  # ConfigError: cuda without a GPU
        # Where the stage that saved the checkpoint stopped reading its input: partition -> offset
        # (an int: partition 0, from before the windows topic had partitions; None: the start).
        self.resume_offset: dict[int, int] | int | None = None
        self.tokenizer = make_tokenizer(config)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_window: int | None = None  # last window trained on
        self.unusable_ids, self._unusable_logged = 0, -10.0  # events whose ids were not ours
        # model.context: entity value -> its last events of the windows trained on (None: off)
        self.history = EntityHistory.for_config(config)
        # training.exclude_top_fraction: the alerter's per-entity state, to rank a window by
        self.surprise = SurpriseRanking.for_config(config)
        self.left_out = 0  # events of the last window trained that exclude_top_fraction left out
        self.timings: dict[str, float] = {}  # seconds per phase of the last train_ordered
        # sessions.entity: the session LM (built with the tokenizer) and the last window's scores
        self.sessions: SessionModel | None = None
        self.session_scores: list[SessionScore] = []

    @property
    def ready(self) -> bool:
        """True once a model has been trained on at least one window."""
        return self.model is not None and self.last_window is not None

    def _ensure_model(self, read: Callable[[], Iterator[Event]]) -> None:
        if self.model is not None:
            return
        if needs_fit(self.tokenizer):  # vocabulary / merges learned from the first window only
            self.tokenizer.fit(e.text_fields for e in read())
        torch.manual_seed(self.config.seed)
        # Initialised on the CPU, then moved: the same first weights on every device.
        self.model = build_model(model_args_for(self.config, self.tokenizer.vocab_size)).to(self.device)
        tc = self.config.training
        self.optimizer = make_optimizer(self.model, tc.learning_rate, tc.weight_decay)

    def encode(self, events: Sequence[Event]) -> list[Sequence[int]]:
        """Each event's BOS..EOS ids, after its entity's context when model.context is on."""
        own = self.encode_own(events)
        if self.history is None:
            return own
        return [with_context(ids, self.history.context(e)) for e, ids in zip(events, own)]

    def encode_own(self, events: Sequence[Event]) -> list[Sequence[int]]:
        """Each event's own BOS..EOS ids: those its record carries when they are this model's
        (``bytes`` as the scorer's reader gives the char tokenizer's, else a list), else its text
        encoded (``bytes`` from the char tokenizer, else a list)."""
        max_tokens, vocab_size = self.config.tokenizer.max_tokens, self.tokenizer.vocab_size
        encoded = []
        for e in events:
            ids = e.token_ids
            if ids is not None and usable_ids(ids, vocab_size, max_tokens):
                encoded.append(ids if type(ids) is bytes else list(ids))  # bytes: the char ids
                continue
            if ids is not None:
                self._unusable_ids(e)
            encoded.append(encode_event(self.tokenizer, e.text_fields, max_tokens))
        return encoded

    def _unusable_ids(self, event: Event) -> None:
        """Count (and log, at most every 10 s) an event whose ids were encoded again."""
        self.unusable_ids += 1
        now = time.monotonic()
        if now - self._unusable_logged >= 10.0:
            self._unusable_logged = now
            log.warning("event %s: its token ids are not this model's (%d events so far): "
                        "encoded again from its text; is a tokenizer stage running another "
                        "tokenizer config, or is someone else writing to the topic?",
                        printable("{}[{}]@{}".format(*event.source)) if event.source
                        else f"line {event.line}",
                        self.unusable_ids)

    def score(self, window: int, events: Sequence[Event]) -> list[Score]:
        """Scores in deterministic event order; empty losses until a model exists."""
        events = sorted(events, key=event_order)
        if not self.ready:
            return [Score(e, window, None, None) for e in events]
        encoded = self.encode(events)  # ids only: a few bytes per token
        tc = self.config.training
        results = score_sequences(self.model, encoded, score_batch_size(tc, self.device),
                                  device=self.device, precision=tc.precision,
                                  per_token=self.config.scores.explain)  # per-token losses: only to explain
        if not self.config.scores.explain:
            return [Score(e, window, mean, total) for e, (mean, total, _) in zip(events, results)]
        # The predicted tokens: all after BOS (EOS included), or for the bidirectional model
        # the ones strictly between BOS and EOS; the same order as the per-token losses.
        inner = self.config.model.kind == "rnn" and self.config.model.rnn.bidirectional
        return [
            Score(e, window, mean, total, tuple(per_token),
                  tuple(self.tokenizer.decode(ids[1:-1] if inner else ids[1:])))
            for e, ids, (mean, total, per_token) in zip(events, map(event_ids, encoded), results)
        ]

    def train(self, window: int, events: Sequence[Event],
              on_progress: Callable[[int, float, float], None] | None = None) -> float:
        """Train on the window (or its ``training.sample_events`` sample); ``on_progress(epoch
        from 1, fraction of that epoch, fraction of the window)`` after every batch."""
        ordered = sorted(events, key=event_order)
        return self.train_ordered(window, lambda: iter(ordered), len(ordered), on_progress)

    def train_ordered(self, window: int, read: Callable[[], Iterator[Event]], total: int,
                      on_progress: Callable[[int, float, float], None] | None = None) -> float:
        """Train on a window's ``total`` events as ``read()`` yields them, in event order, each
        call from the start: a few passes (the sample, the vocabulary), then one chunk of
        ``training.max_chunk_events`` at a time, so that what is held at once is bounded by the
        chunk, not the window (the streaming trainer reads them back from disk)."""
        tc = self.config.training
        clock = time.perf_counter()
        keep = sample_mask((sample_key(e, self.config.seed) for e in read()), total, tc.sample_events)
        self.timings = {"sample": time.perf_counter() - clock}  # seconds per phase, for the log
        sample = keep  # the training.sample_events sample (None: every event)

        def sampled() -> Iterator[Event]:
            return read() if sample is None else (e for e, k in zip(read(), sample) if k)

        self.left_out = 0
        if self.surprise is not None:
            # Only what could be trained on is scored and ranked (the sample, when there is one):
            # scoring the whole window here would cost the trainer as much as the training.
            size = total if sample is None else int(sample.sum())
            leave_out = self.surprise.top(window, sampled, self.losses(sampled, size))
            if leave_out is not None:
                self.left_out = int(leave_out.sum())
                log.info("window %d: its %d most surprising events left out of training",
                         window, self.left_out)
                if sample is None:
                    keep = ~leave_out
                else:  # leave_out is over the sample: map it back to the window's events
                    keep = sample.copy()
                    keep[np.flatnonzero(sample)[leave_out]] = False
        self.timings["exclude"] = time.perf_counter() - clock - self.timings["sample"]

        def chosen() -> Iterator[Event]:
            return read() if keep is None else (e for e, k in zip(read(), keep) if k)

        count = total if keep is None else int(keep.sum())
        fitted = needs_fit(self.tokenizer)
        self._ensure_model(chosen)
        # The window was scored with the old vocabulary; its new values get ids now, before
        # training, so the ids they use from the next window on are trained on this one. Here,
        # not in the callers, so replay and the streaming trainer cannot differ.
        grown = 0 if fitted else self.grow(chosen())
        if grown:
            log.info("window %d: %d new word values in the vocabulary", window, grown)
        # Seeds depend on (seed, window) only, so a resumed run repeats an uninterrupted one.
        seed = self.config.seed * 1_000_003 + window
        torch.manual_seed(seed)  # dropout
        # A window larger than max_chunk_events is trained chunk after chunk (in event order),
        # so the encoded sequences and shuffles held at once stay bounded.
        losses, start = [], 0
        for index, chunk in enumerate(batched(chosen(), tc.max_chunk_events)):
            on_batch = None if on_progress is None else _chunk_progress(
                on_progress, tc.epochs, start, len(chunk), count)
            losses.append(train_sequences(
                self.model, self.optimizer, self.encode(chunk),
                epochs=tc.epochs, batch_size=tc.batch_size, grad_clip=tc.grad_clip,
                seed=seed + 7919 * index, on_batch=on_batch,
                device=self.device, precision=tc.precision,
            ))
            start += len(chunk)
        self.timings["train"] = time.perf_counter() - clock - sum(self.timings.values())
        if self.history is not None:  # after training: w's events were trained with windows < w
            for chunk in batched(read(), tc.max_chunk_events):  # all of them, not the sample
                self.history.remember(zip(chunk, self.encode_own(chunk)))
        if self.config.sessions.entity:  # after the event model: its random numbers stay its own
            if self.sessions is None:
                self.sessions = SessionModel(self.config, self.tokenizer.param_start).to(self.device)
            self.session_scores = self.sessions.process(window, self.template_ids(read()), self.device)
        self.last_window = window
        return sum(losses) / len(losses) if losses else float("nan")

    def losses(self, read: Callable[[], Iterator[Event]], total: int) -> np.ndarray | None:
        """The mean loss of each of the ``total`` events ``read()`` yields (NaN: nothing to
        predict) under the current model, chunk by chunk: 8 bytes an event. None: no model yet."""
        if not self.ready:
            return None
        tc = self.config.training
        out = np.full(total, np.nan)
        start = 0
        for chunk in batched(read(), tc.max_chunk_events):
            results = score_sequences(self.model, self.encode(chunk),
                                      score_batch_size(tc, self.device), device=self.device,
                                      precision=tc.precision, per_token=False)
            out[start:start + len(chunk)] = [mean for mean, _, _ in results]
            start += len(chunk)
        return out

    def template_ids(self, events: Iterable[Event]) -> Iterator[tuple[Event, int]]:
        """Each event with its template id (its first token after BOS), chunk by chunk."""
        for chunk in batched(events, self.config.training.max_chunk_events):
            yield from ((e, ids[1]) for e, ids in zip(chunk, self.encode_own(chunk)))

    def grow(self, events: Iterable[Event]) -> int:
        """Give the window's new word values ids of their own (nn/tokenizers.py
        WordTokenizer.grow); returns how many. Each new id's embedding row (tied to its output
        row) starts as a copy of the OOV bucket the value hashed to until now, so the model
        first treats it as it treated the unknown value, not as an untrained row whose logit
        every earlier window pushed down."""
        if not isinstance(self.tokenizer, WordTokenizer) or self.model is None:
            return 0
        added = self.tokenizer.grow(e.text_fields for e in events)
        if not added:
            return 0
        tok = self.tokenizer
        new = [tok.index[name][w] for name, words in added.items() for w in words]
        buckets = [tok.oov_start(name) + stable_bucket(w, tok.oov_buckets)
                   for name, words in added.items() for w in words]
        weight = self.model.wte.weight
        with torch.no_grad():
            weight[torch.tensor(new, device=weight.device)] = weight[
                torch.tensor(buckets, device=weight.device)]
        return len(new)

    def process_window(self, window: int, events: Sequence[Event]) -> list[Score]:
        scores = self.score(window, events)
        self.train(window, events)
        return scores

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path, resume_offset: dict[int, int] | int | None = None) -> None:
        """Checkpoint the model, optimizer, tokenizer and last window, with the input position
        the saving stage resumes from (the trainer's windows-topic offset)."""
        save_checkpoint(
            path,
            resume_offset=resume_offset,
            config=config_to_dict(self.config),
            model_args=model_args_of(self.model) if self.model is not None else None,
            model=self.model.state_dict() if self.model is not None else None,
            optimizer=self.optimizer.state_dict() if self.optimizer is not None else None,
            tokenizer=self.tokenizer.state_dict(),
            last_window=self.last_window,
            history=self.history.state_dict() if self.history is not None else None,
            surprise=self.surprise.state_dict() if self.surprise is not None else None,
            sessions=self.sessions.state_dict() if self.sessions is not None else None,
        )

    @classmethod
    def load(cls, path: str | Path, config: Config) -> WindowLearner:
        """Rebuild from a checkpoint; CheckpointError if it is damaged or was made by a
        different model / tokenizer / seed configuration (its scores would not continue ours)."""
        data = load_checkpoint(path)
        try:
            current = config_to_dict(config)
            saved = added_keys_filled(renamed_keys_applied(data["config"]), current)
            # A checkpoint from before tokenizer.mask existed read unmasked text: masking off.
            saved.get("tokenizer", {}).setdefault("mask", config_to_dict(Config())["tokenizer"]["mask"])
            # Attention, context and templates: compared only where used (config.compared_sections)
            saved, now = compared_sections(saved), compared_sections(current)
            for section in ("model", "tokenizer", "seed"):
                if saved[section] != now[section]:
                    diff = config_differences(saved[section], now[section], section)
                    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
                    raise CheckpointError(f"{path}: made with another {section} configuration: "
                                          f"{'; '.join(diff[:3])}{more}; use the config it was "
                                          f"made with (--config, --set)")
            learner = cls(config)
            learner.tokenizer = tokenizer_from_state(data["tokenizer"])
            if (isinstance(learner.tokenizer, WordTokenizer) and config.tokenizer.word.grow
                    and not learner.tokenizer.grow_enabled):
                log.warning("%s predates tokenizer.word.grow: its vocabulary stays frozen (its ids "
                            "fill the model); start from an empty state dir to grow one", path)
            if data["model_args"] is not None:
                learner.model = build_model(data["model_args"])
                learner.model.load_state_dict(data["model"])  # CPU tensors, whatever wrote them
                learner.model.to(learner.device)  # before the optimizer: its state follows
                tc = config.training
                learner.optimizer = make_optimizer(learner.model, tc.learning_rate, tc.weight_decay)
                load_optimizer_state(learner.optimizer, learner.model, data["optimizer"])
            learner.last_window = data["last_window"]
            learner.history = EntityHistory.from_state(data.get("history"), config)
            learner.surprise = SurpriseRanking.from_state(data.get("surprise"), config)
            if data.get("sessions") is not None and config.sessions.entity:
                learner.sessions = SessionModel.from_state(data["sessions"], config, learner.device)
        except (CheckpointError, ConfigError):  # a ConfigError is ours (the device), not the file's
            raise
        except Exception as exc:  # missing keys, wrong shapes, a tokenizer state that is not ours
            raise CheckpointError(f"{path}: inconsistent checkpoint ({exc.__class__.__name__}: "
                                  f"{exc})") from exc
        learner.resume_offset = data.get("resume_offset")
        return learner
