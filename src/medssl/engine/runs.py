"""Run folders: resolved config, case lists, git commit, logs, checkpoints and a human summary."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import medssl
from medssl.config import Config, config_from_dict, dump_config
from medssl.data.atomic import write_json, write_text
from medssl.errors import ConfigError
from medssl.machine import machine

import yaml


def git_commit() -> dict:
    """The commit (and dirtiness) of the medssl source, or of the working directory."""
    for where in (Path(medssl.__file__).resolve().parent, Path.cwd()):
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            if sha:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
                return {"commit": sha, "dirty": bool(dirty), "where": str(where)}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": None, "dirty": None, "where": None}


class RunDir:
    """A run folder. Only rank 0 writes into it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    @classmethod
    def for_config(cls, cfg: Config) -> "RunDir":
        return cls(Path(cfg.output_dir).expanduser() / cfg.name)

    # layout
    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def check_new(self) -> None:
        """Refuse to start over an existing run (nothing is ever overwritten)."""
        if self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(f"run folder {self.path} already exists: pass --resume to continue it, "
                              f"or choose another name= / output_dir=")

    def start(self, cfg: Config, *, resume: bool, kind: str) -> None:
        """Create the folder (refusing to overwrite an existing run unless resuming)."""
        if not resume:
            self.check_new()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.yaml").exists():
            write_text(self.path / "config.yaml", dump_config(cfg))
        write_json(self.path / "environment.json", {
            "kind": kind, "medssl": medssl.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "git": git_commit(),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        })

    def saved_config(self) -> Config:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"{self.path}: no config.yaml: not a medssl run folder")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        try:
            return config_from_dict(data)
        except ConfigError as exc:  # name the file: the key alone does not say which run is at fault
            raise ConfigError(f"{path}: {exc}") from None

    def log(self, record: dict) -> None:
        with open(self.path / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
