"""What the grid asks Slurm's own commands (``squeue``, ``sacct``, ``scancel``, ``sinfo``) and reads back from them.

The grid polls job states itself instead of blocking in submitit's ``job.result()``: without accounting (no
slurmdbd, common on small clusters) submitit sees a cancelled job as UNKNOWN forever and waits; with it, submitit
warns on every failed ``sacct`` call. ``squeue -t all`` knows every job for ``MinJobAge`` seconds after it ends (300
by default), which a poll every few seconds never outlives; ``sacct`` is asked only about jobs squeue no longer
knows. ``scontrol show job`` reads the same controller state as squeue, so it would add nothing.

Every call here has a timeout and returns None when the command is missing or does not answer, so a slow controller
never hangs the grid.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# states in which Slurm may still run (or is running) the job
ACTIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
# reasons a PENDING job will never start: its dependency failed (clusters without kill_invalid_depend leave such jobs
# pending forever), or it asks for more than the partition allows
NEVER_STARTS = frozenset(
    {
        "DependencyNeverSatisfied",
        "PartitionConfig",
        "BadConstraints",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "InvalidAccount",
        "InvalidQOS",
    }
)
TIMEOUT_S = 30


@dataclass(frozen=True)
class SlurmState:
    state: str  # COMPLETED, FAILED, CANCELLED, RUNNING, ... (sacct's "CANCELLED by 0" is cut to its first word)
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _run(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def squeue_states(ids: list[str]) -> dict[str, SlurmState] | None:
    """States of the jobs the controller still knows (every job for ``MinJobAge`` s after it ends); None when
    squeue does not answer. Unknown ids are simply absent."""
    if not ids:
        return {}
    done = _run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if done is None:
        return None
    if done.returncode != 0:
        # every id unknown (purged, or never existed) is an error of squeue's, not of the controller
        return {} if "invalid job id" in done.stderr.lower() else None
    states = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = SlurmState(parts[1], parts[2])
    return states


def sacct_states(ids: list[str]) -> tuple[dict[str, SlurmState] | None, str]:
    """(states from accounting, or None when sacct is missing or accounting is off; sacct's own words on failure)."""
    done = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"])
    if done is None:
        return None, "sacct not found"
    if done.returncode != 0:
        return None, " ".join(done.stderr.split()) or f"sacct exited {done.returncode}"
    states = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 2 and parts[1]:
            states[parts[0]] = SlurmState(parts[1].split()[0])
    return states, ""


def job_state(job_id: str) -> SlurmState | None:
    """One job's state from squeue, else sacct; ``SlurmState("UNKNOWN")`` when neither knows it; None when Slurm
    cannot be asked from here (no squeue)."""
    states = squeue_states([job_id])
    if states is None:
        return None
    if job_id in states:
        return states[job_id]
    accounted, _why = sacct_states([job_id])
    return (accounted or {}).get(job_id, SlurmState("UNKNOWN"))


def cancel(ids: list[str]) -> bool:
    """``scancel`` the jobs (silent for jobs that already ended); False when scancel failed or is missing."""
    if not ids:
        return True
    done = _run(["scancel", *ids])
    return done is not None and done.returncode == 0


def partitions() -> list[str]:
    done = _run(["sinfo", "-h", "-o", "%R"], timeout=10)
    if done is None or done.returncode != 0:
        return []
    return sorted({line.strip() for line in done.stdout.splitlines() if line.strip()})


def cluster_has_gpus() -> bool | None:
    """Whether any node offers a GPU gres (``sinfo -h -o %G``); None when sinfo does not answer."""
    done = _run(["sinfo", "-h", "-o", "%G"], timeout=10)
    if done is None or done.returncode != 0:
        return None
    return any("gpu" in line.lower() for line in done.stdout.splitlines())


# -- sbatch's refusals ---------------------------------------------------------------------------------------------


def sbatch_message(text: str) -> str:
    """sbatch's stderr as one line: its error lines without the ``sbatch: error:`` prefix, repeats dropped."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = re.sub(r"^\s*sbatch:\s*(error:\s*)?", "", raw).strip()
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines) or "no message"


def rejection_fix(message: str, gpus_per_job: int, partition: str | None) -> str:
    """The flag that fixes what sbatch refused, from its message."""
    low = message.lower()
    if "generic resource" in low or "gres" in low:
        if gpus_per_job and cluster_has_gpus() is False:
            return "this cluster has no GPUs (sinfo -o %G lists no gpu gres): pass --gpus-per-job 0"
        return f"pass --gpus-per-job 0, or a GPU count the partition offers (asked {gpus_per_job})"
    if "partition" in low:
        names = partitions()
        here = f"; partitions here: {', '.join(names)}" if names else ""
        what = f"partition {partition}" if partition else "the default partition"
        if "not available" in low or "inactive" in low or "drain" in low:
            return f"{what} takes no jobs now: pass --slurm-partition NAME{here}"
        return f"pass --slurm-partition NAME{here}"
    if "account" in low:
        return "pass --slurm-account NAME (sacctmgr show assoc user=$USER lists yours)"
    if "qos" in low:
        return "pass --slurm-qos NAME that your account may use (sacctmgr show assoc user=$USER)"
    if "time limit" in low:
        return "pass a smaller --time (minutes) that the partition allows (sinfo -o '%P %l')"
    if "memory" in low:
        return "pass --slurm-option mem=SIZE that a node has (sinfo -o '%P %m')"
    if "node configuration is not available" in low:
        return "ask for less (--gpus-per-job, --slurm-option cpus-per-task=N / mem=SIZE)"
    return (
        "fix the Slurm flags (--slurm-partition, --slurm-account, --slurm-qos, --slurm-option, --gpus-per-job, --time)"
    )


# -- what a job left in its logs ------------------------------------------------------------------------------------

# the last line of a Python traceback: "module.Class: message" (or a bare "Class"), not indented
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


def job_exception(stderr_text: str) -> str | None:
    """The exception a job died of, in one line ("FmcacheError: cache ... has layers 1..5; layer 99 does not
    exist"), from its stderr: the line that ends the last traceback there, its class without the module path."""
    lines = stderr_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    for line in lines[starts[-1] + 1 :]:
        if not line.strip() or line[:1].isspace():
            continue  # a frame ("  File ...") or its source line
        match = _EXC_LINE.match(line.rstrip())
        if match:
            name, text = match.group(1).rsplit(".", 1)[-1], (match.group(2) or "").strip()
            return f"{name}: {text}" if text else name
    return None


def last_words(path: Path) -> str | None:
    """The last non-empty line of a log (slurmstepd's "*** JOB 12 ON vm CANCELLED AT ... ***", an OOM kill)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
