"""Stage processes move their start-up objects out of the garbage collector's reach
(pipeline.runner.settle_start_up_objects), after collecting the garbage made so far. Each check
runs in a fresh interpreter: the collector's state belongs to the whole process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import ROOT


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_start_up_objects_are_frozen_and_earlier_garbage_is_not():
    out = run_python("""
        import gc, weakref
        from pipeline.runner import settle_start_up_objects

        class Node:
            pass

        kept, lost = Node(), Node()
        lost.me = lost  # a cycle: only the collector frees it
        gone = weakref.ref(lost)
        del lost
        before = gc.get_freeze_count()
        settle_start_up_objects()
        frozen = not any(o is kept for o in gc.get_objects())  # the collector no longer walks it
        print(before, gc.get_freeze_count() > 10_000, gone() is None, frozen)
    """)
    assert out == "0 True True True"


def test_a_stage_runner_settles_before_its_loop(tmp_path):
    """A real StageRunner (stopped before it reads, so no broker is needed) freezes at run()."""
    out = run_python(f"""
        import gc
        from pipeline.config import config_from_dict
        from pipeline.runner import StageRunner, StopFlag
        from pipeline.stages.windower import WindowerStage

        config = config_from_dict({{"kafka": {{"bootstrap.servers": "127.0.0.1:9"}},
                                   "streaming": {{"state_dir": {str(tmp_path)!r}}}}})
        stop = StopFlag()
        runner = StageRunner(config, lambda: WindowerStage(config), stop=stop)
        stop.stopped = True
        before = gc.get_freeze_count()
        print(before, runner.run(), gc.get_freeze_count() > 10_000)
    """)
    assert out == "0 0 True"
