"""Everything the plugin remembers, under one ``QgsSettings`` prefix; secrets only in QGIS's
authentication database (the settings hold an ``authcfg`` id, never a passphrase)."""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Callable

from qgis.core import QgsApplication, QgsAuthMethodConfig, QgsSettings

from rs_qgis_plugin.core.errors import SpecError
from rs_qgis_plugin.core.profile import ConnectionProfile
from rs_qgis_plugin.log import get_logger
from rs_qgis_plugin.logic import SETTINGS_PREFIX, SUMMARY_KEYS, JobRecord, cluster_text

log = get_logger("settings")

PROFILES = SETTINGS_PREFIX + "profiles"
JOBS = SETTINGS_PREFIX + "jobs"
LAST_PROFILE = SETTINGS_PREFIX + "last_profile"
RESULTS_DIR = SETTINGS_PREFIX + "results_dir"
# Per profile, what the last "Test connection" said about where jobs run (no secrets: the master
# and where it came from). Beside the profiles, not inside: a profile's group is the profile.
CLUSTER_SUMMARIES = SETTINGS_PREFIX + "cluster_summaries"
AUTH_METHOD = "Basic"


def plugin_data_dir() -> Path:
    """The plugin's folder in the active QGIS profile (known_hosts, exports, results)."""
    path = Path(QgsApplication.qgisSettingsDirPath()) / "rs_qgis_plugin"
    path.mkdir(parents=True, exist_ok=True)
    return path


def known_hosts_path() -> Path:
    return plugin_data_dir() / "known_hosts"


def results_dir() -> Path:
    """Where each job's results are downloaded (``<folder>/<job id>/``): the "Results folder"
    of the jobs panel, by default a folder in the QGIS profile."""
    value = QgsSettings().value(RESULTS_DIR, "", type=str)
    path = Path(value) if value else plugin_data_dir() / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_results_dir(path: str | Path | None) -> Path:
    """Sets the results folder for jobs started from now on (``None``: back to the default);
    jobs already started keep theirs. Raises :class:`SpecError` when it cannot be made."""
    if not path:
        QgsSettings().remove(RESULTS_DIR)
        return results_dir()
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecError(f"cannot use {folder} as the results folder: {e.strerror or e}") from e
    QgsSettings().setValue(RESULTS_DIR, str(folder))
    return folder


# -- connection profiles -------------------------------------------------------------------------
def profile_names() -> list[str]:
    s = QgsSettings()
    s.beginGroup(PROFILES)
    try:
        return sorted(s.childGroups())
    finally:
        s.endGroup()


def _profile_key(name: str) -> str:
    # QSettings treats '/' as a group separator
    return f"{PROFILES}/{name.replace('/', '_')}"


def load_profile(name: str) -> ConnectionProfile:
    text = QgsSettings().value(_profile_key(name) + "/profile", "", type=str)
    if not text:
        raise SpecError(f"there is no connection profile {name!r}; create it in the plugin's "
                        "connection settings")
    return ConnectionProfile.from_dict(json.loads(text))


def profile_authcfg(name: str) -> str:
    return QgsSettings().value(_profile_key(name) + "/authcfg", "", type=str)


def save_profile(profile: ConnectionProfile, authcfg: str = "") -> None:
    s = QgsSettings()
    s.setValue(_profile_key(profile.name) + "/profile", json.dumps(profile.to_dict()))
    s.setValue(_profile_key(profile.name) + "/authcfg", authcfg)
    s.setValue(LAST_PROFILE, profile.name)


def delete_profile(name: str) -> None:
    QgsSettings().remove(_profile_key(name))
    QgsSettings().remove(_summary_key(name))


def _summary_key(name: str) -> str:
    return f"{CLUSTER_SUMMARIES}/{name.replace('/', '_')}"


def save_cluster_summary(name: str, summary: dict[str, str] | None) -> None:
    """Remembers where the jobs of profile ``name`` run, as :func:`logic.cluster_summary` took it
    from ``rs-cluster env``; ``None`` forgets it."""
    if not summary:
        QgsSettings().remove(_summary_key(name))
        return
    kept = {k: cluster_text(summary[k]) for k in SUMMARY_KEYS if isinstance(summary.get(k), str)}
    QgsSettings().setValue(_summary_key(name), json.dumps(kept, ensure_ascii=False))


def load_cluster_summary(name: str) -> dict[str, str] | None:
    """What the last "Test connection" of profile ``name`` said about where its jobs run; None
    when it was never tested (or what is stored cannot be read)."""
    if not name:
        return None
    text = QgsSettings().value(_summary_key(name), "", type=str)
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if k in SUMMARY_KEYS and isinstance(v, str)} or None


def last_profile() -> str:
    return QgsSettings().value(LAST_PROFILE, "", type=str)


# -- secrets ---------------------------------------------------------------------------------------
def store_passphrase(profile_name: str, passphrase: str, authcfg: str = "") -> str:
    """Stores a key passphrase in the QGIS authentication database; returns its authcfg id."""
    am = QgsApplication.authManager()
    config = QgsAuthMethodConfig(AUTH_METHOD)
    if authcfg:
        am.loadAuthenticationConfig(authcfg, config, True)
        config.setMethod(AUTH_METHOD)
    config.setName(f"RS Buildings SSH key ({profile_name})")
    config.setConfig("username", profile_name)
    config.setConfig("password", passphrase)
    if authcfg and config.id():
        ok = am.updateAuthenticationConfig(config)
    else:
        ok = am.storeAuthenticationConfig(config)
    ok = ok[0] if isinstance(ok, tuple) else ok
    if not ok:
        raise SpecError("QGIS could not store the passphrase: set or unlock the master password "
                        "of the authentication database (Settings > Options > Authentication)")
    return config.id()


def load_passphrase(authcfg: str) -> str | None:
    """The passphrase behind an authcfg id, or ``None`` (no id, or the database is locked)."""
    if not authcfg:
        return None
    config = QgsAuthMethodConfig()
    result = QgsApplication.authManager().loadAuthenticationConfig(authcfg, config, True)
    ok = result[0] if isinstance(result, tuple) else result
    if not ok:
        log.warning("could not read authentication configuration %s", authcfg)
        return None
    return config.config("password") or None


# -- job records -----------------------------------------------------------------------------------
# Told which job record was saved or forgotten, in whichever thread did it (Processing algorithms
# save theirs from a worker thread), so the jobs panel can show it. Bound methods, held weakly:
# a listener that is gone is dropped, never called.
_listeners: list[weakref.WeakMethod] = []
_listeners_lock = threading.Lock()


def add_job_listener(method: Callable[[str], None]) -> None:
    with _listeners_lock:
        _listeners[:] = [ref for ref in _listeners if ref() is not None]
        _listeners.append(weakref.WeakMethod(method))


def remove_job_listener(method: Callable[[str], None]) -> None:
    with _listeners_lock:
        _listeners[:] = [ref for ref in _listeners if ref() not in (None, method)]


def job_changed(job_id: str) -> None:
    """Tells the listeners that the record of ``job_id`` (or what uses it) changed."""
    with _listeners_lock:
        alive = [m for m in (ref() for ref in _listeners) if m is not None]
    for method in alive:
        method(job_id)


def load_job(job_id: str) -> JobRecord | None:
    text = QgsSettings().value(f"{JOBS}/{job_id}", "", type=str)
    if not text:
        return None
    try:
        return JobRecord.from_json(text)
    except (ValueError, TypeError) as e:
        log.warning("unreadable job record %s: %s", job_id, e)
        return None


def load_jobs() -> list[JobRecord]:
    s = QgsSettings()
    s.beginGroup(JOBS)
    try:
        keys = s.childKeys()
        texts = [s.value(k, "", type=str) for k in keys]
    finally:
        s.endGroup()
    records = []
    for key, text in zip(keys, texts):
        try:
            records.append(JobRecord.from_json(text))
        except (ValueError, TypeError) as e:
            log.warning("forgetting unreadable job record %s: %s", key, e)
            QgsSettings().remove(f"{JOBS}/{key}")
    return sorted(records, key=lambda r: r.created or r.job_id, reverse=True)


def save_job(record: JobRecord) -> None:
    QgsSettings().setValue(f"{JOBS}/{record.job_id}", record.to_json())
    job_changed(record.job_id)


def forget_job(job_id: str) -> None:
    QgsSettings().remove(f"{JOBS}/{job_id}")
    job_changed(job_id)
