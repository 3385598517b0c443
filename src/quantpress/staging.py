"""The one staging mechanism: a folder is built in `<out>.partial/` and appears whole, or not at all.

    <out>.partial/
        progress.json   what the staged work was made with (fingerprint) and how far it got
        layers/         the writer's resumable pieces (quantize: one file per finished layer)
        final/          the finished folder, assembled from the pieces
        replaced/       an earlier <out> being replaced (--overwrite), until the new one is in place

Publishing is a fixed sequence of steps, each a single rename or an atomic write, so a process
killed between any two of them leaves a state the next run recognises and finishes:

    1. progress.json says `assembled`     (final/ is complete; a re-run skips straight to 2)
    2. <out> -> .partial/replaced         (only when replacing an earlier output)
    3. .partial/final -> <out>            (the new output is in place, whole)
    4. remove .partial                    (pieces, the replaced output)

A staging folder is only ever removed when it holds quantpress's own `progress.json` (or nothing
but an empty pieces folder, left by a kill right after its creation).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantpress.errors import OutputExistsError
from quantpress.formats.hf_folder import atomic_write_json

log = logging.getLogger(__name__)

PUBLISH_STEPS = 4
StepDone = Callable[[int, int], None]  # (step, of); raising in it simulates a kill between steps


@dataclass(frozen=True)
class Staging:
    out: Path  # the folder being built

    @property
    def path(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def manifest(self) -> Path:
        return self.path / "progress.json"

    @property
    def pieces(self) -> Path:
        return self.path / "layers"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def replaced(self) -> Path:
        return self.path / "replaced"

    def state(self) -> dict:
        return json.loads(self.manifest.read_text()) if self.manifest.exists() else {}

    def update(self, **changes) -> None:
        atomic_write_json(self.manifest, {**self.state(), **changes})

    @property
    def assembled(self) -> bool:
        return bool(self.state().get("assembled")) and self.final.is_dir()

    def check_ours(self) -> None:
        """Refuse to touch a `<out>.partial` that quantpress did not make."""
        if not (self.path.exists() or self.path.is_symlink()) or self.manifest.is_file():
            return
        contents = list(self.path.iterdir()) if self.path.is_dir() and not self.path.is_symlink() else None
        if contents == [] or (contents == [self.pieces] and not any(self.pieces.iterdir())):
            return  # made by a run killed before it wrote progress.json
        raise OutputExistsError(f"{self.path} exists and was not made by quantpress (no progress.json); "
                                "move it away or choose another output folder")

    def recover(self) -> None:
        """Finish what a killed run left behind before this run looks at `out`: after step 3 the
        output is complete and only the staging folder is left to remove. (A kill between steps 2
        and 3 is finished by `publish`, or undone by `discard` when the settings changed.)"""
        if not self.manifest.is_file():
            return
        if self.state().get("assembled") and not self.final.exists() and self.out.exists():
            log.info("%s was published by an interrupted run; removing its staging folder", self.out)
            shutil.rmtree(self.path)

    def open(self, fingerprint: dict) -> dict:
        """Reuse the staging folder if it was made with `fingerprint`, else start a fresh one.
        Returns its progress state."""
        self.check_ours()
        if self.path.exists():
            state = self.state()
            if state.get("fingerprint") == json.loads(json.dumps(fingerprint)):
                log.info("resuming %s: %d layers already done", self.path, state.get("layers_done", 0))
                return state
            log.info("discarding %s: it was made with other settings", self.path)
            self.discard()
        self.pieces.mkdir(parents=True)
        fresh = {"fingerprint": fingerprint, "layers_done": 0, "modules": [], "assembled": False}
        atomic_write_json(self.manifest, fresh)
        return fresh

    def discard(self) -> None:
        """Remove the staging folder, first putting back an output it was replacing."""
        if self.replaced.is_dir() and not self.out.exists():
            self.replaced.rename(self.out)
        shutil.rmtree(self.path)

    def begin_final(self) -> Path:
        """An empty final/ to assemble into (a killed assembly's files are redone)."""
        if self.final.exists():
            shutil.rmtree(self.final)
        self.final.mkdir()
        return self.final

    def publish(self, step_done: StepDone | None = None) -> None:
        """Steps 1-4 above; resumes from whichever step a killed run reached."""
        def done(step: int) -> None:
            if step_done is not None:
                step_done(step, PUBLISH_STEPS)

        if not self.state().get("assembled"):
            self.update(assembled=True)
        done(1)
        if self.out.exists() or self.out.is_symlink():
            if self.replaced.exists():
                raise OutputExistsError(f"{self.out} reappeared while {self.replaced} still holds the output "
                                        "it replaces; move one of them away")
            self.out.rename(self.replaced)
        done(2)
        self.final.rename(self.out)
        done(3)
        shutil.rmtree(self.path)
        done(4)
