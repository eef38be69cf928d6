"""Jobs on the cluster, seen from the plugin: submit, watch, cancel, fetch results.

Everything goes through ``rs-cluster`` on the cluster (its argument list from the profile), with
``--json`` output parsed by :mod:`rs_qgis_plugin.core.protocol`; files go through
:class:`rs_qgis_plugin.core.transfer.Transfers`. Safe to call from a ``QgsTask.run``.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from rs_qgis_plugin.core.commands import job_argv, rs_cluster_argv
from rs_qgis_plugin.core.errors import (
    CancelledError,
    ProtocolError,
    RemoteCommandError,
    SpecError,
    TransferError,
    UnsafeRemoteNameError,
)
from rs_qgis_plugin.core.jobspec import (
    JobSpec,
    check_relative_path,
    job_id_problem,
    relative_path_problem,
)
from rs_qgis_plugin.core.protocol import (
    JobStatus,
    ProgressEvent,
    checked_job_id,
    parse_events,
    parse_status,
)
from rs_qgis_plugin.core.ssh import CancelFlag, SshClient
from rs_qgis_plugin.core.training import preview_epoch
from rs_qgis_plugin.core.transfer import (
    PRIVATE_FILE_MODE,
    ProgressCallback,
    TransferResult,
    Transfers,
    local_path_under,
)


# `rs-cluster env --probe` starts a Spark application and waits up to two minutes for an executor
# to run its tasks: far longer than the plain report.
ENV_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 300.0
# A training preview is a few small tiles side by side (tens of kB): anything far larger is not one.
MAX_PREVIEW_BYTES = 4 * 1024 * 1024


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"{what}: the cluster did not answer JSON: {text[:200]!r}") from e


class RemoteJobs:
    def __init__(self, client: SshClient, transfers: Transfers | None = None) -> None:
        self.client = client
        self.profile = client.profile
        self.transfers = transfers or Transfers(client)

    def job_dir(self, job_id: str) -> str:
        problem = job_id_problem(job_id)
        if problem is not None:
            raise SpecError(f"job id {job_id!r} {problem}")
        return posixpath.join(self.profile.workspace_path, "jobs", job_id)

    def env(self, probe: bool = False, *, cancel: CancelFlag | None = None) -> dict[str, Any]:
        """What the cluster runs (versions, GPUs) and its effective settings (``cluster``): the
        connection check of the settings dialog. With ``probe``, also what a tiny Spark job
        found (``probe``: the executors and the ``problems``, none meaning ready); the probe
        exits 1 when it found problems, and its report is the answer then too."""
        argv = rs_cluster_argv(self.profile, "env", *(["--probe"] if probe else []))
        result = self.client.run(argv, check=False, cancel=cancel,
                                 timeout=PROBE_TIMEOUT_S if probe else ENV_TIMEOUT_S)
        data: Any = None
        if result.exit_status == 0 or (probe and result.exit_status == 1):
            try:
                data = json.loads(result.stdout)
            except ValueError:
                pass
        if result.exit_status != 0 and not (isinstance(data, dict)
                                            and isinstance(data.get("probe"), dict)):
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RemoteCommandError(f"{argv[0]} failed on {self.profile.host} "
                                     f"(exit {result.exit_status}): {last}",
                                     command=" ".join(argv), exit_status=result.exit_status,
                                     stderr=result.stderr)
        if not isinstance(data, dict):
            raise ProtocolError(f"rs-cluster env: the cluster did not answer a JSON object: "
                                f"{result.stdout[:200]!r}")
        return data

    def upload_inputs(self, spec: JobSpec, inputs: Mapping[str, str | os.PathLike[str]], *,
                      progress: ProgressCallback | None = None,
                      cancel: CancelFlag | None = None) -> list[TransferResult]:
        """Uploads local files or folders to paths relative to the job folder (``inputs/...``)."""
        plan: list[tuple[Path, str]] = []
        for rel, local in inputs.items():
            base = posixpath.join(self.job_dir(spec.job_id), check_relative_path(rel, "input"))
            local = Path(local)
            if local.is_dir():
                for path in sorted(p for p in local.rglob("*") if p.is_file()):
                    plan.append((path, posixpath.join(base, *path.relative_to(local).parts)))
            elif local.is_file():
                plan.append((local, base))
            else:
                raise TransferError(f"input {local} does not exist")
        total = sum(p.stat().st_size for p, _ in plan)
        done_before = 0
        results = []
        for path, remote in plan:
            def each(done: int, size: int, percent: float, _base: int = done_before) -> None:
                if progress:
                    all_done = _base + done
                    progress(all_done, total, 100.0 if not total else 100.0 * all_done / total)

            results.append(self.transfers.upload(path, remote, progress=each, cancel=cancel))
            done_before += path.stat().st_size
        return results

    def submit(self, spec: JobSpec, inputs: Mapping[str, str | os.PathLike[str]] | None = None,
               *, progress: ProgressCallback | None = None,
               cancel: CancelFlag | None = None) -> JobStatus:
        """Uploads the inputs and the spec into the job folder, then starts the job."""
        job_dir = self.job_dir(spec.job_id)
        self.transfers.makedirs(posixpath.join(job_dir, "inputs"))
        self.upload_inputs(spec, inputs or {}, progress=progress, cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before the job was started")
        sftp = self.client.sftp()
        tmp = posixpath.join(job_dir, ".job.json.tmp")
        with sftp.open(tmp, "wb") as f:
            f.chmod(PRIVATE_FILE_MODE)  # before the spec is in it: it names the analyst's data
            f.write(spec.to_json().encode("utf-8"))
        sftp.posix_rename(tmp, posixpath.join(job_dir, "job.json"))
        result = self.client.run(job_argv(self.profile, "submit", job_dir), timeout=120)
        return parse_status(result.stdout, expect_job_id=spec.job_id)

    def status(self, job_id: str) -> JobStatus:
        return parse_status(self.client.run(job_argv(self.profile, "status", job_id)).stdout,
                            expect_job_id=job_id)

    def events(self, job_id: str, since: int = 0) -> tuple[list[ProgressEvent], int]:
        """Events from number ``since`` on, and the number to pass next time."""
        out = self.client.run(job_argv(self.profile, "events", job_id, "--since", str(since)))
        events = parse_events(out.stdout)
        return events, since + len(events)

    def log_tail(self, job_id: str, lines: int = 50) -> list[str]:
        """The last ``lines`` lines of the job's log on the cluster: the cluster's own text, to be
        shown as plain text only."""
        out = self.client.run(job_argv(self.profile, "log", job_id, "--tail", str(int(lines))))
        return out.stdout.splitlines()[-lines:]

    def cancel(self, job_id: str) -> JobStatus:
        return parse_status(self.client.run(job_argv(self.profile, "cancel", job_id)).stdout,
                            expect_job_id=job_id)

    def list(self) -> list[dict[str, Any]]:
        data = _json(self.client.run(job_argv(self.profile, "list")).stdout, "rs-cluster job list")
        if not isinstance(data, list):
            raise ProtocolError(f"rs-cluster job list answered {str(data)[:200]}")
        for i, job in enumerate(data):
            checked_job_id(job, f"rs-cluster job list entry {i}")
        return data

    def clean(self, job_id: str) -> None:
        self.client.run(job_argv(self.profile, "clean", job_id))

    def wait(self, job_id: str, *, poll_s: float = 2.0, timeout: float | None = None,
             on_event: Callable[[ProgressEvent], None] | None = None,
             on_status: Callable[[JobStatus], None] | None = None,
             cancel: CancelFlag | None = None) -> JobStatus:
        """Polls until the job ends. ``cancel`` stops the waiting, not the job (see :meth:`cancel`)."""
        since = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            events, since = self.events(job_id, since)
            for event in events:
                if on_event:
                    on_event(event)
            status = self.status(job_id)
            if on_status:
                on_status(status)
            if status.is_finished:
                events, since = self.events(job_id, since)
                for event in events:
                    if on_event:
                        on_event(event)
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout:g} s")
            end = time.monotonic() + poll_s
            while time.monotonic() < end:
                if cancel is not None and cancel.is_set():
                    raise CancelledError(f"stopped waiting for job {job_id} (it keeps running)")
                time.sleep(min(0.1, poll_s))

    def fetch_preview(self, job_id: str, rel: str, local_dir: str | os.PathLike[str], *,
                      cancel: CancelFlag | None = None) -> Path:
        """Downloads one training preview the job's events named (``previews/epoch-NNNN.png``,
        nothing else) into ``local_dir`` under the same relative path, and returns it. Refused
        before any byte is fetched: any other name, a link, or a file over
        ``MAX_PREVIEW_BYTES``."""
        if preview_epoch(rel) is None:
            raise UnsafeRemoteNameError(f"job {job_id}: {rel!r} is not a training preview "
                                        "(previews/epoch-NNNN.png); not downloaded")
        job_dir = self.job_dir(job_id)
        remote = posixpath.join(job_dir, rel)
        listed = list(self.transfers.walk_remote(remote, root=job_dir))
        if [path for path, _ in listed] != [remote]:
            raise UnsafeRemoteNameError(f"job {job_id}: preview {rel} is not a file; not "
                                        "downloaded")
        size = listed[0][1]
        if size > MAX_PREVIEW_BYTES:
            raise TransferError(f"job {job_id}: preview {rel} is {size} bytes, more than a "
                                f"preview's {MAX_PREVIEW_BYTES}; not downloaded")
        target = local_path_under(local_dir, rel, what="preview")
        self.transfers.download(remote, target, cancel=cancel)
        return target

    def fetch_outputs(self, job_id: str, local_dir: str | os.PathLike[str],
                      paths: Iterable[str] | None = None, *,
                      progress: ProgressCallback | None = None,
                      cancel: CancelFlag | None = None) -> list[Path]:
        """Downloads the job's results (``status.results``, or ``paths`` relative to the job
        folder) into ``local_dir``, keeping their relative paths.

        Every remote name is checked (and links refused) before the first byte is fetched, so a
        hostile name raises :class:`UnsafeRemoteNameError` with nothing written; every local
        path is confined to ``local_dir``."""
        job_dir = self.job_dir(job_id)
        wanted = list(paths) if paths is not None else list(self.status(job_id).results)
        files: list[tuple[str, Path, int]] = []
        for rel in wanted:
            problem = relative_path_problem(rel)
            if problem is not None:
                raise UnsafeRemoteNameError(f"result {rel!r} of job {job_id} {problem}")
            rel = check_relative_path(rel, "result")
            for remote, size in self.transfers.walk_remote(posixpath.join(job_dir, rel),
                                                           root=job_dir):
                target = local_path_under(local_dir, posixpath.relpath(remote, job_dir))
                files.append((remote, target, size))
        total = sum(size for _, _, size in files)
        fetched, done_before = [], 0
        for remote, target, size in files:
            def each(done: int, _size: int, percent: float, _base: int = done_before) -> None:
                if progress:
                    all_done = _base + done
                    progress(all_done, total, 100.0 if not total else 100.0 * all_done / total)

            self.transfers.download(remote, target, progress=each, cancel=cancel)
            fetched.append(target)
            done_before += size
        return fetched
