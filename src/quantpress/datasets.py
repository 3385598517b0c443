"""Text sources for calibration and evaluation: the bundled sets as a small table, or any file.

The GPTQ paper's protocol (spec B6/B7) joins wikitext's rows with "\n\n" and tokenizes once. Our
wikitext files hold one dataset row per line, so `join_rows` reproduces that join. The wikitext
*train* split is not bundled: calibration uses `valid`, evaluation uses `test` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantpress.errors import CalibrationError


@dataclass(frozen=True)
class BundledText:
    calibration: str  # path under assets/data used to calibrate (and train the bundled model)
    evaluation: str  # path under assets/data held out for perplexity
    join_rows: bool  # rejoin the file's rows with "\n\n", as the paper's loader does


BUNDLED: dict[str, BundledText] = {
    "wikitext2": BundledText("wikitext-2/valid.txt", "wikitext-2/test.txt", join_rows=True),
    "tinyshakespeare": BundledText(
        "tinyshakespeare/input.txt", "tinyshakespeare/input.txt", join_rows=False
    ),
}


def bundled_data_dir() -> Path:
    return Path(str(resources.files("quantpress") / "assets" / "data"))


def _read(path: Path, join_rows: bool) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"text file not found: {path}") from None
    except OSError as e:  # a folder, unreadable, ...
        raise CalibrationError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text: {e}") from None
    if join_rows:
        # The HF rows of a blank line are "", the file's are " \n": map them back before joining.
        rows = text.splitlines(keepends=True)
        text = "\n\n".join("" if not row.strip() else row for row in rows)
    if not text.strip():
        raise CalibrationError(f"{path} contains no text")
    return text


def check_dataset(dataset: str) -> Path | None:
    """Fail early unless `dataset` is a bundled name or an existing text file; returns the file
    (None for a bundled set)."""
    if dataset in BUNDLED:
        return None
    path = Path(dataset)
    if not path.is_file():
        names = ", ".join(sorted(BUNDLED))
        found = "a folder" if path.is_dir() else "not found"
        raise CalibrationError(f"dataset {dataset!r} is neither a bundled set ({names}) nor a text file ({found})")
    return path


def load_text(dataset: str, split: str) -> str:
    """Text of `dataset` (a bundled name or a file path) for split "calibration" or "evaluation"."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    path = check_dataset(dataset)
    if path is None:
        entry = BUNDLED[dataset]
        rel = entry.calibration if split == "calibration" else entry.evaluation
        return _read(bundled_data_dir() / rel, entry.join_rows)
    return _read(path, join_rows=False)
