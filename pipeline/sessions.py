"""Session scores: a window's sessions, each read as one sequence of template ids and scored when
the window closes, by a small LM of the earlier windows' sessions (``sessions.*``).

A per-line model cannot see what is wrong with a session whose every line is normal: a step
missing, one too many, two swapped (an HDFS block written but never replicated). Here a session
is the window's events with the same ``sessions.entity`` value, in event order; each event is
one symbol, its template id (the template tokenizer's first token, unknown-template buckets
included), and the session is ``[BOS] t1 t2 ... tn [EOS]``, so a session that stops early is
surprising too. A session longer than ``sessions.max_events`` is read in parts of that many
events (only the last one ends in EOS). Its score is the mean loss per predicted symbol over all
its parts, nats, as an event's loss is per token.

As for events, window w's sessions are scored by the model trained through w-1, then the model
trains on them. A session that spans windows is one session per window. Both happen in
``WindowLearner.train_ordered``, in the streaming trainer (which publishes the scores to
``topics.sessions``) and in replay (``pipeline replay --sessions FILE``) alike, so they give the
same numbers. Held while a window is processed: 4 bytes an event and about 0.3 KB a session.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from nn.scoring import score_sequences
from nn.tokenizers import BOS, EOS
from nn.training import build_model, load_optimizer_state, make_optimizer, train_sequences
from pipeline.compute import score_batch_size
from pipeline.config import Config
from pipeline.parsing import Event
from pipeline.scorefile import format_loss, format_number

SESSION_COLUMNS = ["window", "session", "events", "first_line", "last_line", "first_time",
                   "last_time", "loss", "loss_total"]


@dataclass(frozen=True)
class SessionScore:
    window: int
    session: str  # the sessions.entity value
    events: int
    first_line: int  # of its first and last event (0 when unknown, as Event.line)
    last_line: int
    first_time: float | None
    last_time: float | None
    loss: float | None  # mean loss per predicted symbol (nats); None: no model yet (first window)
    loss_total: float | None  # summed over them


class _Session:
    __slots__ = ("symbols", "first_line", "last_line", "first_time", "last_time")

    def __init__(self, event: Event):
        self.symbols = array("i")
        self.first_line, self.first_time = event.line, event.time
        self.last_line, self.last_time = event.line, event.time


def group(events: Iterable[tuple[Event, int]], entity: Callable[[Event], str]
          ) -> dict[str, _Session]:
    """Each session of the (event, symbol) pairs (in event order), in order of first event;
    events without a session value belong to none."""
    sessions: dict[str, _Session] = {}
    for event, symbol in events:
        value = entity(event)
        if not value:
            continue
        session = sessions.get(value)
        if session is None:
            session = sessions[value] = _Session(event)
        session.symbols.append(symbol)
        session.last_line, session.last_time = event.line, event.time
    return sessions


def sequences(symbols: Sequence[int], max_events: int) -> list[list[int]]:
    """A session's symbols as model sequences: parts of ``max_events``, BOS first, EOS after the
    last part only."""
    parts = [list(symbols[i:i + max_events]) for i in range(0, len(symbols), max_events)]
    return [[BOS, *part, *([EOS] if i == len(parts) - 1 else [])] for i, part in enumerate(parts)]


class SessionModel:
    """The session LM, its optimizer, and the last window it trained on."""

    def __init__(self, config: Config, vocab_size: int):
        self.config = config
        sc = config.sessions
        self.model_args = {"kind": "rnn", "vocab_size": vocab_size, "cell": "lstm",
                           "hidden_size": sc.hidden_size, "n_layer": 1, "bidirectional": False,
                           "dropout": 0.0, "attention": "none", "block_size": sc.max_events + 2}
        # Its own seed, set here: the event model's random numbers stay as they were.
        torch.manual_seed(config.seed * 1_000_003 + 2)
        self.model = build_model(self.model_args)
        tc = config.training
        self.optimizer = make_optimizer(self.model, tc.learning_rate, tc.weight_decay)
        self.last_window: int | None = None  # the last window with sessions it trained on

    def to(self, device: torch.device) -> SessionModel:
        """Before any optimizer step: its state follows the parameters."""
        self.model.to(device)
        return self

    def process(self, window: int, events: Iterable[tuple[Event, int]], device: torch.device
                ) -> list[SessionScore]:
        """Score the window's sessions with the model of the windows before it, then train on
        them; ``events``: the window's, in event order, each with its template id."""
        entity_name, inputs = self.config.sessions.entity, self.config.input
        sessions = group(events, lambda e: e.entity(entity_name, inputs))
        max_events, tc = self.config.sessions.max_events, self.config.training
        parts = [sequences(s.symbols, max_events) for s in sessions.values()]
        flat = list(itertools.chain.from_iterable(parts))
        totals: list[float | None] = [None] * len(parts)
        if self.last_window is not None and flat:
            results = iter(score_sequences(self.model, flat, score_batch_size(tc, device),
                                           device=device, precision=tc.precision, per_token=False))
            totals = [sum(next(results)[1] for _ in seqs) for seqs in parts]
        scores = []
        for (value, s), seqs, total in zip(sessions.items(), parts, totals):
            steps = sum(len(seq) - 1 for seq in seqs)
            scores.append(SessionScore(window, value, len(s.symbols), s.first_line, s.last_line,
                                       s.first_time, s.last_time,
                                       None if total is None else total / steps, total))
        if flat:
            seed = self.config.seed * 1_000_003 + window + 7
            torch.manual_seed(seed)
            train_sequences(self.model, self.optimizer, flat, epochs=tc.epochs,
                            batch_size=tc.batch_size, grad_clip=tc.grad_clip, seed=seed,
                            device=device, precision=tc.precision)
            self.last_window = window  # the windows after it are scored (none trained: none)
        return scores

    def state_dict(self) -> dict:
        return {"model_args": self.model_args, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "last_window": self.last_window}

    @classmethod
    def from_state(cls, state: dict, config: Config, device: torch.device) -> SessionModel:
        """The session model a checkpoint saved (KeyError / RuntimeError when it does not fit
        the config: the caller names the file)."""
        session_model = cls(config, state["model_args"]["vocab_size"])
        if state["model_args"] != session_model.model_args:
            raise ValueError(f"session model made with {state['model_args']!r}, the config "
                             f"gives {session_model.model_args!r}")
        session_model.model.load_state_dict(state["model"])
        session_model.to(device)
        tc = config.training
        session_model.optimizer = make_optimizer(session_model.model, tc.learning_rate, tc.weight_decay)
        load_optimizer_state(session_model.optimizer, session_model.model, state["optimizer"])
        session_model.last_window = state["last_window"]
        return session_model


def session_row(score: SessionScore) -> list[str]:
    """A session score as a row of SESSION_COLUMNS (the replay file's)."""
    return [str(score.window), score.session, str(score.events), str(score.first_line),
            str(score.last_line), format_number(score.first_time), format_number(score.last_time),
            format_loss(score.loss), format_loss(score.loss_total)]
