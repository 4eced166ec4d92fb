"""The run's log file (lm.logfile): library logs and deprecation notices land in ``<run>/logs/<command>.log``,
not on the terminal; warnings and errors still reach it."""

from __future__ import annotations

import logging
import warnings

import pytest

from lm.logfile import close_log_file, log_path, open_log_file


@pytest.fixture
def run_log(tmp_path):
    yield lambda verbose=False: open_log_file(str(tmp_path / "runs" / "tiny"), "tiny", "run", verbose=verbose)
    close_log_file()


def test_the_log_lives_under_a_local_run_and_in_a_local_folder_for_object_storage(tmp_path):
    assert log_path(str(tmp_path / "runs/x"), "x", "train") == tmp_path / "runs/x/logs/train.log"
    assert log_path(f"file://{tmp_path}/runs/x", "x", "run") == tmp_path / "runs/x/logs/run.log"
    remote = log_path("s3://bucket/lmforge/runs/x", "x", "tune")
    assert remote.parts[-4:] == ("lmforge", "x", "logs", "tune.log") and "s3:" not in str(remote)


def test_library_logs_land_in_the_file_and_only_warnings_reach_the_terminal(run_log, capfd):
    import ray  # noqa: F401  (Ray's own "ray" logger, with its own terminal handler, exists once imported)

    path = run_log()
    assert not path.parent.exists()  # nothing logged yet: no folder (a command failing early leaves none)
    logging.getLogger("ray.data._internal.execution").info("Starting execution of Dataset dataset_0")
    logging.getLogger("ray").info("Started a local Ray instance.")
    logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    logging.getLogger("lmforge.workers").info("(RayTrainWorker pid=1) DeepSpeed op built successfully")
    logging.getLogger("ray.train").warning("a worker died: restarting from the last checkpoint")
    logging.getLogger("some.library").warning("the disk is slow")
    logging.getLogger("some.library").error("disk full")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`ray_remote_args` is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("the tokenizer saw no text", UserWarning, stacklevel=1)
    for handler in logging.getLogger().handlers:
        handler.flush()
    terminal = capfd.readouterr()
    text = path.read_text()
    for line in ("Starting execution of Dataset dataset_0", "Started a local Ray instance.", "built successfully",
                 "Token authentication is enabled",
                 "a worker died", "disk full", "DeprecationWarning: `ray_remote_args` is deprecated",
                 "UserWarning: the tokenizer saw no text"):
        assert line in text, line
    for line in ("Starting execution", "Started a local Ray instance", "built successfully", "deprecated",
                 "Token authentication"):
        assert line not in terminal.out + terminal.err, line
    # (Ray's own handler writes to the stderr of the moment ray was first imported: not checked here)
    for line in ("the disk is slow", "disk full", "the tokenizer saw no text"):
        assert line in terminal.err, line


def test_verbose_shows_library_info_on_the_terminal_too(run_log, capfd):
    path = run_log(verbose=True)
    logging.getLogger("lmforge.workers").info("(RayTrainWorker pid=1) DeepSpeed op built successfully")
    assert "built successfully" in capfd.readouterr().err
    close_log_file()
    assert "built successfully" in path.read_text()
    logging.getLogger("lmforge.workers").warning("after close")
    assert "after close" not in path.read_text()  # closed: the handlers are gone


def test_a_logger_without_handlers_that_does_not_propagate_still_logs_to_the_file(run_log, capfd):
    """Ray's ``ray`` logger after ``ray.init(configure_logging=False)``: handlers cleared, propagate off; its
    records used to reach logging.lastResort (the terminal) only."""
    before = logging.lastResort
    lonely = logging.getLogger("lmforge-test.lonely")
    lonely.propagate, lonely.handlers = False, []
    lonely.setLevel(logging.INFO)
    path = run_log()
    lonely.info("Started a local Ray instance.")
    lonely.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
    lonely.warning("the object store is full")
    terminal = capfd.readouterr().err
    assert "the object store is full" in terminal and "Started" not in terminal and "Token" not in terminal
    text = path.read_text()
    assert "Started a local Ray instance." in text and "Token authentication" in text and "object store" in text
    close_log_file()
    assert logging.lastResort is before
