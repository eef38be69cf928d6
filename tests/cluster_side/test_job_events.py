"""What a job's events add up to (issue 14): the runner's count of warnings and the train stage's
verdict in status.json and the job's message, the previews folder a train step gets, and
``rs-cluster job events --follow``, which shows a running job to a person until it ends.

Jobs run the real runner and the test-only ``sleep`` stage (tests/cluster_selftest.py) in real
processes; its ``--train-finish`` reports a finish event of the stage "train" with whatever fields
the test gives, the well-formed ones of the train stage and ones of the wrong type.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rs_cluster.jobs import apply_event, success_message, train_quality
from rs_cluster.progress import EVENT_SCHEMA_VERSION, TerminalReporter, parse_event, render_event

from tests import cluster_selftest
from tests.cluster_side.test_jobs import ENDED, cli, sleep_spec, status_of, write_spec
from tests.procs import job_pids, wait_for

WEAK = {"message": "trained 8 epochs; best validation IoU 0.412 at epoch 7",
        "best_val_iou": 0.412, "best_epoch": 7, "verdict": "weak",
        "verdict_reason": "validation IoU 0.412 is under 0.5",
        "advice": "try more epochs, more image pairs, or fine-tuning a model"}


def run_to_end(tmp_path: Path, job_id: str, **params: object) -> dict:
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec(job_id, **params))))
    return wait_for(lambda: (s := status_of(ws, job_id))["state"] in ENDED and s)


# -- status.json and the message --------------------------------------------------------------

def test_warnings_of_the_steps_are_counted_and_said_in_the_message(tmp_path):
    final = run_to_end(tmp_path, "warn1", seconds=0.2, steps=2, warnings=2)
    assert (final["state"], final["warnings"], final["verdict"]) == ("succeeded", 2, None)
    assert final["message"] == "done with 2 warning(s)"
    events = [json.loads(x) for x in cli(tmp_path / "ws", "job", "events", "warn1").stdout.splitlines()]
    assert events[-1]["stage"] == "job" and events[-1]["message"] == "done with 2 warning(s)"


def test_a_train_finish_gives_the_job_its_verdict_and_says_it_in_the_message(tmp_path):
    final = run_to_end(tmp_path, "verd1", seconds=0.2, steps=2, warnings=1,
                       train_finish=json.dumps(WEAK))
    assert final["state"] == "succeeded" and final["warnings"] == 1
    assert final["verdict"] == {"verdict": "weak", "reason": WEAK["verdict_reason"],
                                "advice": WEAK["advice"], "best_val_iou": 0.412, "best_epoch": 7}
    assert final["message"] == ("done with 1 warning(s); best validation IoU 0.412 at epoch 7; "
                                "weak model: validation IoU 0.412 is under 0.5")


def test_a_failed_job_keeps_its_error_as_message_and_counts_its_warnings(tmp_path):
    final = run_to_end(tmp_path, "verd2", seconds=0.2, steps=1, fail=True, warnings=1)
    assert final["state"] == "failed" and "failed on purpose" in final["message"]
    assert final["warnings"] == 1


@pytest.mark.parametrize("fields, verdict, message", [
    # a verdict that is no text is left out; the IoU, well formed, still counts
    ({"verdict": 1, "best_val_iou": 0.5, "best_epoch": 3, "verdict_reason": "x"}, None,
     "done; best validation IoU 0.500 at epoch 3"),
    # numbers that are not finite or of the wrong type go; texts are cut to one line of 500
    ({"verdict": "weak", "best_val_iou": float("inf"), "best_epoch": "7",
      "verdict_reason": "\x1b[2J" + "r" * 2000, "advice": ["rm -rf /"]},
     {"verdict": "weak", "reason": " [2J" + "r" * 496, "advice": "", "best_val_iou": None,
      "best_epoch": None},
     "done; weak model:  [2J" + "r" * 496),
    ({"verdict": "splendid", "best_val_iou": float("nan"), "best_epoch": True}, None, "done"),
], ids=["verdict-not-text", "wrong-types-and-long-text", "unknown-verdict"])
def test_hostile_train_finish_fields_are_dropped(tmp_path, fields, verdict, message):
    final = run_to_end(tmp_path, "hostile", seconds=0.1, steps=1, train_finish=json.dumps(fields))
    assert final["state"] == "succeeded"
    assert final["verdict"] == verdict
    assert final["message"] == message


@pytest.mark.parametrize("event, expected", [
    ({"verdict": "ok", "best_val_iou": 1, "best_epoch": 0},
     {"verdict": "ok", "reason": "", "advice": "", "best_val_iou": 1.0, "best_epoch": None}),
    ({"verdict": "ok", "best_val_iou": 1.5, "best_epoch": -1},
     {"verdict": "ok", "reason": "", "advice": "", "best_val_iou": None, "best_epoch": None}),
    ({"verdict": ["weak"], "best_val_iou": True, "verdict_reason": 7, "advice": None},
     {"verdict": None, "reason": "", "advice": "", "best_val_iou": None, "best_epoch": None}),
    ({}, {"verdict": None, "reason": "", "advice": "", "best_val_iou": None, "best_epoch": None}),
])
def test_train_quality_keeps_only_well_typed_fields(event, expected):
    assert train_quality({"event": "finish", "stage": "train", **event}) == expected


def test_success_message_parts():
    assert success_message(0, {}) == "done"
    assert success_message(1, {"best_val_iou": 0.4126}) == "done with 1 warning(s); best validation IoU 0.413"
    assert success_message(0, {"verdict": "weak", "reason": ""}) == "done; weak model"
    assert success_message(0, {"verdict": "ok", "best_val_iou": 0.9, "best_epoch": 2,
                               "reason": "ignored when ok"}) == "done; best validation IoU 0.900 at epoch 2"


def test_a_preview_note_does_not_take_the_place_of_the_epochs_message():
    """Found by the demo: "preview after epoch 8" hid "epoch 8/50 done" from the jobs panel."""
    status: dict = {"message": "queued", "progress": 0.0}
    trained: dict = {}
    apply_event(status, {"event": "progress", "percent": 40.0, "message": "epoch 8/50 done"},
                1, 2, trained)
    assert (status["message"], status["progress"]) == ("epoch 8/50 done", 70.0)
    apply_event(status, {"event": "info", "message": "preview after epoch 8",
                         "preview": "previews/epoch-0008.png", "epoch": 8}, 1, 2, trained)
    assert status["message"] == "epoch 8/50 done"
    apply_event(status, {"event": "info", "message": "the val split is small"}, 1, 2, trained)
    assert status["message"] == "the val split is small"


# -- train steps get a previews folder ---------------------------------------------------------

def test_a_train_step_is_given_a_private_previews_folder_in_the_job(tmp_path):
    """A train step on a dataset that is not there fails at once: enough to see what the runner
    started it with. The sleep step of another job gets no --previews."""
    ws = tmp_path / "ws"
    spec = {"schema_version": 1, "job_id": "prev1", "steps": [
        {"stage": "train", "params": {"data": "inputs/none", "model_dir": "outputs/model",
                                      "epochs": 1}}]}
    env = {**os.environ, "PYTHONPATH": cluster_selftest.pythonpath()}
    subprocess.run([sys.executable, "-m", cluster_selftest.ENTRY_MODULE, "--quiet", "job", "submit",
                    "--workspace", str(ws), str(write_spec(tmp_path, spec))], check=True, env=env,
                   umask=0o022, capture_output=True, timeout=60)
    final = wait_for(lambda: (s := status_of(ws, "prev1"))["state"] in ENDED and s)
    job = ws / "jobs" / "prev1"
    command = next(line for line in (job / "log.txt").read_text().splitlines()
                   if line.startswith("$ ") and " train " in line)
    assert command.endswith(f" --previews {job / 'previews'}")
    assert (job / "previews").is_dir() and (job / "previews").stat().st_mode & 0o777 == 0o700
    # the train command knows the option: it got as far as looking at its dataset
    assert final["state"] == "failed" and "not a prepared dataset" in final["message"]

    run_to_end(tmp_path, "prev2", seconds=0.1, steps=1)
    assert "--previews" not in (ws / "jobs" / "prev2" / "log.txt").read_text()
    assert not (ws / "jobs" / "prev2" / "previews").exists()


# -- rendering events for people ----------------------------------------------------------------

def event(stage: str, kind: str, **fields: object) -> dict:
    return {"v": EVENT_SCHEMA_VERSION, "time": "2026-01-01T00:00:00.000+00:00", "stage": stage,
            "event": kind, **fields}


def test_render_event_shows_interleaved_stages_each_under_its_own_name():
    out = io.StringIO()  # not a terminal: lines, no bar
    display = TerminalReporter(out)
    for e in [event("job", "start", total=2, unit="steps", message="my job"),
              event("train", "start", total=3, unit="epochs", message="training"),
              event("train", "progress", done=1, total=3, percent=33.3, message="epoch 1"),
              event("train", "progress", done=2, total=3, percent=66.7, message="epoch 2"),
              event("train", "metrics", epoch=3, val_iou=0.41234, lr=None),
              event("train", "warning", message="lost a worker", restart=1, resume_epoch=2),
              event("train", "progress", done=3, total=3, percent=100.0, message="epoch 3"),
              event("train", "info", message="preview after epoch 3",
                    preview="previews/epoch-0003.png", epoch=3),
              event("train", "finish", message="best validation IoU 0.412 at epoch 3"),
              event("job", "progress", done=1, total=2, percent=50.0, message="train exit 0"),
              event("job", "finish", message="done", state="succeeded")]:
        render_event(display, e)
    display.close()
    assert out.getvalue().splitlines() == [
        "[job] my job",
        "[train] training",
        "[train] 1/3 epoch 1",  # the second, within the line interval, is left out
        "[train] epoch=3 val_iou=0.4123 lr=None",
        "[train] warning: lost a worker",
        "[train] 3/3 epoch 3",  # the last always
        "[train] preview after epoch 3",
        "[train] best validation IoU 0.412 at epoch 3",
        "[job] 1/2 train exit 0",
        "[job] done",
    ]


def test_render_event_shows_what_it_can_of_a_malformed_event_and_never_fails():
    out = io.StringIO()
    display = TerminalReporter(out)
    for e in [event(7, "start", total="many", unit=None, message="\x1b[2Jcleared?"),
              event("x", "progress", done="3", total=4),
              event("x", "progress", done=4, total=-1, message=["a"]),
              event("x", "metrics", loss=float("nan"), note="\x07bell" * 50, v2={"a": 1}),
              event("x", "warning", message=None),
              event("x", "teleport", message="unknown kinds are not shown")]:
        render_event(display, e)
    display.close()
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.splitlines()[0] == "[7]  [2Jcleared?"
    assert "[x] 4/? ['a']" in text
    assert "unknown kinds" not in text


# -- job events --follow ------------------------------------------------------------------------

def follower(ws: Path, job_id: str, *args: str) -> subprocess.Popen[str]:
    """``job events JOB --follow`` in its own process group, with SIGINT as a terminal would
    deliver it (a test run from a background shell inherits it ignored)."""
    env = {**os.environ, "PYTHONPATH": cluster_selftest.pythonpath()}
    return subprocess.Popen(
        [sys.executable, "-m", cluster_selftest.ENTRY_MODULE, "--quiet", "job", "events",
         "--workspace", str(ws), job_id, "--follow", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, process_group=0,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


class Lines:
    """A process's stdout, collected line by line as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def all(self) -> list[str]:
        self._thread.join(timeout=30)
        return self.lines


def test_follow_shows_a_running_job_until_it_succeeds(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec(
        "fol1", seconds=3, steps=4, warnings=1, train_finish=json.dumps(WEAK)))))
    started = time.monotonic()
    proc = follower(ws, "fol1")
    out = Lines(proc)
    # it shows the job while it runs, not only once it ended
    wait_for(lambda: "[sleep] 1/4 slept 1/4" in out.lines, what="the first progress line")
    assert status_of(ws, "fol1")["state"] == "running"
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert time.monotonic() - started >= 2.5
    lines = out.all()
    final = status_of(ws, "fol1")
    assert lines[-1] == f"job fol1 succeeded: {final['message']}"
    assert final["message"].startswith("done with 1 warning(s); best validation IoU 0.412 at epoch 7")
    expected = ["[job] sleep fol1", "[sleep] sleeping 3 s", "[sleep] 1/4 slept 1/4",
                "[sleep] warning: selftest warning 1 of 1", "[sleep] 4/4 slept 4/4",
                "[sleep] slept", f"[train] {WEAK['message']}", "[job] 1/1 sleep exit 0",
                f"[job] {final['message']}"]
    assert [line for line in lines if line in expected] == expected


def test_follow_exits_1_when_the_job_fails_or_is_cancelled(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("fol2", seconds=1, fail=True))))
    proc = cli(ws, "job", "events", "fol2", "--follow", check=False)
    assert proc.returncode == 1
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("job fol2 failed: ") and "failed on purpose" in last

    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("fol3", seconds=60, steps=60))))
    running = follower(ws, "fol3")
    out = Lines(running)
    wait_for(lambda: "[sleep] 1/60 slept 1/60" in out.lines, what="the first progress line")
    cli(ws, "job", "cancel", "fol3")
    assert running.wait(timeout=30) == 1
    assert out.all()[-1] == "job fol3 cancelled: cancelled"


def test_follow_json_prints_the_event_lines_as_they_come(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("fol4", seconds=2, warnings=1))))
    proc = follower(ws, "fol4", "--json")
    out = Lines(proc)
    wait_for(lambda: any('"progress"' in line for line in out.lines), what="a progress event")
    assert status_of(ws, "fol4")["state"] == "running"
    assert proc.wait(timeout=60) == 0
    lines = out.all()
    parsed = [parse_event(line) for line in lines]  # every line is an event, nothing else
    assert parsed[-1]["stage"] == "job" and parsed[-1]["state"] == "succeeded"
    assert lines == cli(ws, "job", "events", "fol4").stdout.splitlines()
    later = cli(ws, "job", "events", "fol4", "--follow", "--json", "--since", "3").stdout
    assert later.splitlines() == lines[3:]


def test_ctrl_c_stops_following_but_not_the_job(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "job", "submit", str(write_spec(tmp_path, sleep_spec("fol5", seconds=60, steps=60))))
    proc = follower(ws, "fol5")
    out = Lines(proc)
    wait_for(lambda: "[sleep] 1/60 slept 1/60" in out.lines, what="the first progress line")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr is not None
    assert "stopped following job fol5; it goes on running" in proc.stderr.read()
    assert "Traceback" not in "\n".join(out.all())
    done = status_of(ws, "fol5")
    assert done["state"] == "running" and job_pids("fol5")
    time.sleep(1.5)
    assert status_of(ws, "fol5")["progress"] > done["progress"]  # it goes on
    cli(ws, "job", "cancel", "fol5")
    assert job_pids("fol5") == []


def test_follow_refuses_a_job_never_submitted(tmp_path):
    ws = tmp_path / "ws"
    job = ws / "jobs" / "new1"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps(sleep_spec("new1")))
    proc = cli(ws, "job", "events", "new1", "--follow", check=False)
    assert proc.returncode == 2 and "job new1 was never submitted" in proc.stderr
