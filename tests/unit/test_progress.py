"""The live progress line (lm.progress) and the driver's filter of worker output (lm.driver_output): a bar on
a terminal, rate-limited plain lines elsewhere, chatter kept off the terminal."""

from __future__ import annotations

import io

from lm.driver_output import filtered, sort_lines
from lm.progress import FILE_TAG, Display, parse_progress, plain_line, progress_message


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(step: int, **more) -> dict:
    return {"step": step, "loss": 6.0 - step / 10, "lr": 1e-3, "memory_mib": 600.0, **more}


def test_a_workers_record_travels_as_one_tagged_line_and_back():
    line = progress_message("tiny", record(10, tokens_per_s=12000.0, grad_norm=0.5), 30, "step 10/30 loss 5.0")
    update = parse_progress(line)
    assert update == {"run": "tiny", "max_steps": 30, "step": 10, "loss": 5.0, "tokens_per_s": 12000.0,
                      "line": "step 10/30 loss 5.0"}  # only what the progress line shows
    # Ray's worker log: words first
    assert "\n" not in line and line.startswith("step 10/30 loss 5.0  lmforge-progress {")
    for other in ("step 10/30 loss 5.0", "lmforge-progress {not json", 'lmforge-progress {"run": "x"}'):
        assert parse_progress(other) is None


def test_plain_lines_come_at_most_once_per_interval_with_each_runs_first_and_last():
    out, clock = io.StringIO(), Clock()
    shown = Display(out, tty=False, interval_s=10, clock=clock)
    for t, step in [(0, 1), (1, 5), (5, 10), (9, 15), (11, 20), (12, 25), (13, 30)]:
        clock.now = t
        shown.update({"run": "tiny", "max_steps": 30, "step": step, "loss": 1.0, "tokens_per_s": 1000.0})
    shown.finish()
    steps = [line.split("step ")[1].split()[0] for line in out.getvalue().splitlines()]
    assert steps == ["1/30", "20/30", "30/30"]  # first; 11 s after it; the last (never held back)
    assert out.getvalue().splitlines()[1].endswith("1,000 tok/s · ETA 6 s")  # 19 steps in 11 s, 10 to go
    assert "\r" not in out.getvalue()


def test_an_early_stop_prints_its_held_back_record_when_the_progress_ends():
    out, clock = io.StringIO(), Clock()
    shown = Display(out, tty=False, interval_s=60, clock=clock)
    for step in (1, 10, 20):
        shown.update({"run": "tiny", "max_steps": 100, "step": step, "loss": 1.0})
    assert len(out.getvalue().splitlines()) == 1
    shown.finish()
    assert out.getvalue().splitlines()[-1].startswith("train tiny: step 20/100 loss 1.0000")
    shown.update({"run": "tiny", "max_steps": 100, "step": 20, "loss": 1.0})  # forwarded late: old news
    assert len(out.getvalue().splitlines()) == 2
    shown.start("tiny")  # the same run trained again in this process (a notebook, a test session)
    shown.update({"run": "tiny", "max_steps": 100, "step": 1, "loss": 2.0})
    assert out.getvalue().splitlines()[-1].startswith("train tiny: step 1/100 loss 2.0000")


def test_a_terminal_gets_one_bar_for_every_run_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the terminal's width: the bar is cut to it
    out = io.StringIO()
    shown = Display(out, tty=True)
    for step in (1, 10, 20):
        shown.update({"run": "sweep-a", "max_steps": 20, "step": step, "loss": 2.0, "tokens_per_s": 5000.0})
        shown.update({"run": "sweep-b", "max_steps": 20, "step": step, "loss": 3.0, "val_bpb": 3.5})
    shown.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") >= 6  # one line, drawn again at every record
    last = text.rsplit("\r", 1)[-1]
    assert last.startswith("tune 2 trials 100%") and "40/40" in last
    assert last.rstrip().endswith("20/20 loss 2.000 | 20/20 loss 3.000 val 3.500 · 5,000 tok/s")


def test_plain_line_uses_the_workers_own_words():
    update = {"run": "tiny", "max_steps": 30, "step": 10, "loss": 5.0, "line": "step    10/30 loss 5.0000 lr 1e-3"}
    assert plain_line(update, 12.4) == "train tiny: step    10/30 loss 5.0000 lr 1e-3 · ETA 12 s"
    assert plain_line({**update, "step": 30}, 0.0).endswith("lr 1e-3")  # no ETA on the last step


def test_worker_chatter_goes_to_the_log_and_progress_to_the_bar_the_rest_is_printed(caplog):
    lines = ["DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
             "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(...), metrics={...}) from rank 0",
             "[2026-12-04 10:16:32,251 E 29729 29829] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
             "and ID: 'acb2' has constructor arguments in the object store and max_restarts > 0. If the ...",
             "INFO 2026-12-04 10:30:27,961 controller 19565 -- Deploying new version of Deployment(name='model')",
             "WARNING 2026-12-04 10:30:27,963 controller 19565 -- Cannot deregister autoscaling state for deployment "
             "Deployment(name='api', app='lmforge') because it is not registered",
             "✔️  Dataset dataset_0358nKozip37VOO2vCLf98_0 execution finished in 1.20 seconds",
             "WARNING: 8 PYTHON worker processes have been started on node: 1fec57 with address: 127.0.0.1, which is "
             "4x the maximum expected startup concurrency of 2 (2 CPUs), which may cause performance degradation.",
             progress_message("tiny", record(15, val_loss=5.3, val_bpb=4.04), 30),
             "RuntimeError: a real error",
             "WARNING 2026-12-04 10:30:28,001 controller 19565 -- Replica(id='x') failed health check, stopping it",
             "early stop: no better validation loss for 3 evaluations"]
    progress, quiet, shown = sort_lines(lines, verbose=False)
    assert [u["step"] for u in progress] == [15] and quiet == lines[:7] and shown == lines[8:]
    assert sort_lines(lines, verbose=True)[2] == lines[:7] + lines[8:]  # lm --verbose: all of it
    hostname = "[W1204 14:26:59.986419894 socket.cpp:207] [c10d] The hostname of the client socket cannot be retrieved."
    assert sort_lines([hostname], verbose=False)[1] == [hostname]
    tagged = f"{FILE_TAG}train: 60 steps in 44 s; model → trials/a/model"  # a sweep's trial's own line
    assert sort_lines([tagged], verbose=False)[1:] == (["train: 60 steps in 44 s; model → trials/a/model"], [])
    assert sort_lines([tagged], verbose=True)[1:] == ([], ["train: 60 steps in 44 s; model → trials/a/model"])

    printed: list[dict] = []
    out = io.StringIO()
    handle = filtered(printed.append, Display(out, tty=False, interval_s=60), verbose=False)
    with caplog.at_level("INFO", logger="lmforge.workers"):
        handle({"lines": lines, "pid": 42, "actor_name": "RayTrainWorker", "is_err": False})
    assert [batch["lines"] for batch in printed] == [lines[8:]] and printed[0]["pid"] == 42
    assert out.getvalue().startswith("train tiny: step 15/30 loss 4.5000 · val 4.040 bpb")
    assert [r.getMessage() for r in caplog.records] == [f"(RayTrainWorker pid=42) {line}" for line in lines[:7]]


def test_rank_0_prints_each_record_as_a_progress_message_and_quiets_ray_trains_report_lines(capsys, monkeypatch):
    import logging
    import shutil

    from ray.train.v2._internal.execution import context

    from lm.train.run_log import RUN_VAR, RunLog

    monkeypatch.setenv(RUN_VAR, "tiny")
    monkeypatch.delenv("LMFORGE_VERBOSE", raising=False)
    log = RunLog(0, 30)
    try:
        log.add(record(10, tokens_per_s=12000.0, model_gflops=10.5, mfu=0.055))
    finally:
        log.writer.close()
        shutil.rmtree(log.folder, ignore_errors=True)
    update = parse_progress(capsys.readouterr().out.splitlines()[-1])
    assert update["run"] == "tiny" and update["step"] == 10 and update["tokens_per_s"] == 12000.0
    assert update["line"] == "step    10/30 loss 5.0000 lr 1.00e-03 12,000 tok/s 10.5 GFLOP/s MFU 5.5% 600 MiB"
    # "Reporting training result …" is logged by a logger named after its file, which LoggingConfig misses
    assert logging.getLogger(context.__file__).getEffectiveLevel() == logging.WARNING


def test_a_run_ended_by_its_time_budget_shows_the_step_it_will_end_at():
    from lm.train.run_log import RunLog

    timed = RunLog(1, 1_000_000, max_seconds=300)  # schedule_unit: seconds sets max_steps out of reach
    assert timed.expected_steps({"step": 100, "train_s": 15.0}) == 2000  # 100 steps in 15 s of 300
    assert timed.expected_steps({"step": 100}) == 1_000_000  # no time measured yet
    assert RunLog(1, 200, max_seconds=120).expected_steps({"step": 100, "train_s": 30.0}) == 200  # steps end it first


def test_what_prints_while_the_bar_is_live_goes_above_it(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    shown = Display(out, tty=True)
    shown.update({"run": "tiny", "max_steps": 30, "step": 1, "loss": 6.0})
    print("Trial status: 2 RUNNING")  # Ray Tune's own table, say
    shown.update({"run": "tiny", "max_steps": 30, "step": 30, "loss": 5.0})
    shown.finish()
    import sys

    assert sys.stdout is out  # put back
    lines = out.getvalue().split("\n")
    assert len(lines) == 3 and lines[-1] == ""
    assert lines[0].endswith("Trial status: 2 RUNNING") and lines[0].split("\r")[-2].strip() == ""  # bar cleared
    assert "30/30" in lines[1].rsplit("\r", 1)[-1]


def test_pipeline_steps_are_one_status_line_on_a_terminal_and_rate_limited_plain_lines_elsewhere(monkeypatch, caplog):
    out, clock = io.StringIO(), Clock()
    plain = Display(out, tty=False, interval_s=10, clock=clock)
    with caplog.at_level("INFO", logger="lmforge.progress"):
        for t, text in [(0, "data: read"), (4, "data: dedup"), (11, "data: tokenized"), (12, "data: packed")]:
            clock.now = t
            plain.stage(text)
        plain.end_stages()
        plain.stage("data: read (a second pipeline)")  # its first step prints whatever the clock says
    assert out.getvalue().splitlines() == ["data: read", "data: tokenized", "data: read (a second pipeline)"]
    assert [r.getMessage() for r in caplog.records][:4] == ["data: read", "data: dedup", "data: tokenized",
                                                           "data: packed"]  # the log file gets every step

    term = io.StringIO()
    monkeypatch.setattr("sys.stdout", term)
    live = Display(term, tty=True)
    live.stage("data: read [1.0 s]")
    print("data: a line printed meanwhile")  # goes above the status line
    live.stage("data: tokenized [2.0 s]")
    live.end_stages()
    import sys

    assert sys.stdout is term  # put back
    text = term.getvalue()
    assert text.count("\n") == 1 and "data: a line printed meanwhile\n" in text  # the status left no line behind
    assert "data: tokenized [2.0 s]" in text and text.rsplit("\r", 1)[-1].strip() == ""  # replaced, then cleared


def test_the_raylets_messages_to_the_driver_pass_the_same_filter(monkeypatch, caplog):
    """Ray's error listener prints the raylet's messages with its own call (not the log dispatcher's)."""
    import ray._private.worker as ray_worker

    from lm.driver_output import install

    printed: list[tuple[list[str], bool]] = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(
        (data["lines"], ignore_prefix)))
    install(verbose=False)  # no ray.init here: only the error listener's printer is wrapped
    count = ("WARNING: 8 PYTHON worker processes have been started on node: 1fec with address: 127.0.0.1, which is "
             "4x the maximum expected startup concurrency of 2 (2 CPUs), which may cause performance degradation.")
    with caplog.at_level("INFO", logger="lmforge.workers"):
        ray_worker.print_to_stdstream({"lines": [count, "A worker died or was killed"], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
    assert printed == [(["A worker died or was killed"], False)]
    assert [r.getMessage() for r in caplog.records] == [f"(worker pid=raylet) {count}"]
