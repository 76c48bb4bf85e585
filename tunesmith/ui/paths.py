"""Every path typed into the page is checked here before a command sees it.

The server reads and writes only inside its allowed roots (the directory it was started in, and each --allow-path):
on a shared machine a visitor cannot point a dataset preview at /etc or an output directory at someone's home.
Model names that are not paths (the packaged aliases, hub ids) pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class PathPolicy:
    """Where the server may read and write: `workdir` (relative paths start there) and the other `roots`."""

    workdir: Path
    roots: tuple[Path, ...]

    @classmethod
    def create(cls, workdir: str | Path, extra_roots: list[str] | tuple[str, ...] = ()) -> PathPolicy:
        workdir = Path(workdir).resolve()
        return cls(workdir, (workdir, *(Path(root).expanduser().resolve() for root in extra_roots)))

    def resolve(self, raw: str, field: str) -> Path:
        """`raw` as an absolute path inside a root, or a ConfigError naming the field and the allowed roots."""
        value = (raw or "").strip()
        if not value:
            raise ConfigError(f"{field}: empty; type a path")
        if any(character in value for character in "\0\n\r"):
            raise ConfigError(f"{field}: {value!r} holds a control character; type a plain path")
        path = (self.workdir / Path(value).expanduser()).resolve()
        if not any(path == root or root in path.parents for root in self.roots):
            allowed = ", ".join(str(root) for root in self.roots)
            raise ConfigError(
                f"{field}: {path} is outside the directories this server may use ({allowed}); "
                "start `tunesmith webui --allow-path DIR` to add one"
            )
        return path

    def existing_dir(self, raw: str, field: str) -> Path:
        path = self.resolve(raw, field)
        if not path.is_dir():
            raise ConfigError(f"{field}: {path} is not a directory")
        return path

    def output_dir(self, raw: str, field: str) -> Path:
        """A directory to write (created when the job starts), inside the roots and not an existing file."""
        path = self.resolve(raw, field)
        blocking = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ConfigError(f"{field}: {blocking} is a file, not a directory")
        return path

    def model(self, raw: str, field: str = "model") -> str:
        """A packaged alias or a hub id as typed; a local directory or .gguf file as its checked absolute path."""
        from tunesmith.model.resolve import ALIASES, HUB_ID

        value = (raw or "").strip()
        if value.lower() in ALIASES:
            return value
        looks_local = value.startswith((".", "/", "~")) or (self.workdir / value).exists()
        if HUB_ID.match(value) and not looks_local:
            return value
        path = self.resolve(value, field)
        if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
            raise ConfigError(
                f"{field}: {value!r} is not a packaged alias ({', '.join(ALIASES)}), a model directory, "
                "a .gguf file or a hub id (owner/name)"
            )
        return str(path)

    def adapters(self, raw: str, field: str = "adapter") -> list[str]:
        return [str(self.existing_dir(part, field)) for part in (raw or "").split(",") if part.strip()]
