"""What every tab's handlers share: the path policy and the job registry of this server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.ui.jobs import JobRegistry
from tunesmith.ui.paths import PathPolicy


@dataclass
class UiContext:
    policy: PathPolicy
    jobs: JobRegistry

    @classmethod
    def create(cls, workdir: str | Path, allowed: list[str], state_dir: Path) -> UiContext:
        return cls(PathPolicy.create(workdir, allowed), JobRegistry(state_dir / "jobs.json"))

    @property
    def workdir(self) -> Path:
        return self.policy.workdir
