"""Rebuild tests/fixtures/gptqmodel/* with GPTQModel — run with the PROJECT venv.

    QUANTPRESS_PEER_GPTQMODEL_PYTHON=/work/peer/gm/bin/python \
        /work/venv/bin/python tests/peers/regenerate_fixtures.py [--only NAME ...] [--out DIR]

For each entry of FIXTURES: build the seeded tiny source model (tiny_models.py), quantize it with
GPTQModel in the peer venv (gptqmodel_quantize.py) on the shared calibration windows, then load
the result through transformers + GPTQModel (gptqmodel_logits.py) and store its logits on fixed
input_ids. Only the files a loader reads are kept (quant_log.csv holds timings, so it is dropped).

This module is also imported by tests/test_interop_gptqmodel.py for FIXTURES and the subprocess
helpers; it never imports gptqmodel itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PEERS_DIR = Path(__file__).resolve().parent
if __package__:  # imported by the tests as peers.regenerate_fixtures
    from . import tiny_models
else:  # run as a script: tests/peers is sys.path[0]
    import tiny_models

FIXTURES_DIR = PEERS_DIR.parent / "fixtures" / "gptqmodel"
PEER_ENV_VAR = "QUANTPRESS_PEER_GPTQMODEL_PYTHON"
SOURCE_SEED = 0
CALIB_N, CALIB_SEQLEN, CALIB_SEED = 8, 64, 1
EVAL_N, EVAL_SEQLEN, EVAL_SEED = 2, 16, 2
DAMP = 0.1
CHECKPOINT_SUBDIR = "checkpoint"  # <fixture>/checkpoint/ is the GPTQ folder as GPTQModel wrote it
KEPT_FILES = (
    "config.json",
    "quantize_config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    arch: str  # key of tiny_models.SPECS
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    fmt: str  # checkpoint_format GPTQModel writes: "gptq" (v1 zeros-1) or "gptq_v2"

    def quantize_flags(self) -> list[str]:
        return [
            "--bits", str(self.bits),
            "--group-size", str(self.group_size),
            "--desc-act" if self.desc_act else "--no-desc-act",
            "--sym" if self.sym else "--asym",
            "--format", self.fmt,
            "--damp", str(DAMP),
        ]


FIXTURES: tuple[FixtureSpec, ...] = (
    FixtureSpec("llama_4b_g32_act_sym_v1", "llama", 4, 32, True, True, "gptq"),
    FixtureSpec("llama_3b_g64_act_sym_v1", "llama", 3, 64, True, True, "gptq"),
    FixtureSpec("llama_2b_g32_sym_v1", "llama", 2, 32, False, True, "gptq"),
    FixtureSpec("llama_8b_gall_act_sym_v1", "llama", 8, -1, True, True, "gptq"),
    FixtureSpec("llama_4b_g32_act_asym_v2", "llama", 4, 32, True, False, "gptq_v2"),
    FixtureSpec("qwen2_4b_g64_sym_v1", "qwen2", 4, 64, False, True, "gptq"),
)
FIXTURES_BY_NAME = {f.name: f for f in FIXTURES}


def peer_python() -> str | None:
    """The peer venv's interpreter from the environment, or None when it is not configured.

    A set-but-wrong path is returned as is, so callers fail loudly instead of skipping."""
    return os.environ.get(PEER_ENV_VAR) or None


def require_peer_python() -> str:
    python = peer_python()
    if python is None or not Path(python).is_file():
        raise FileNotFoundError(f"{PEER_ENV_VAR}={python!r} is not a python executable")
    return python


def run_peer(python: str, script: str, args: list[str], *, timeout: float = 900) -> str:
    """Run a tests/peers script in the peer venv from a scratch cwd; return its last stdout line.

    The cwd is a temp dir because GPTQModel writes ./logs/ wherever it runs.
    """
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # never let the project's src/ leak into the peer interpreter
    with tempfile.TemporaryDirectory(prefix="qp_peer_cwd_") as cwd:
        proc = subprocess.run(
            [python, str(PEERS_DIR / script), *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[-1] if lines else ""


def write_ids(path: Path, ids: torch.Tensor) -> Path:
    save_file({"input_ids": ids.contiguous()}, str(path))
    return path


def gptqmodel_quantize(python: str, src: Path, out: Path, spec: FixtureSpec, calib: Path) -> dict:
    line = run_peer(python, "gptqmodel_quantize.py",
                    [str(src), str(out), *spec.quantize_flags(), "--examples", str(calib)])
    return json.loads(line) if line else {}


def gptqmodel_logits(python: str, gptq_dir: Path, ids: Path, out: Path, *, native: bool = False) -> dict[str, str]:
    """Logits of `gptq_dir` through transformers+GPTQModel (or GPTQModel.load, `native`) into
    `out`; returns the run's facts (kernel, forward/dequant dtypes, versions) the script prints."""
    # GPTQModel's own TorchLinear runs in fp16/bf16 only; through transformers it runs in fp32
    dtype = "float16" if native else "float32"
    line = run_peer(python, "gptqmodel_logits.py", [str(gptq_dir), str(ids), str(out), "--dtype", dtype,
                                                    *(["--native"] if native else [])])
    return json.loads(line)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixture_markdown(spec: FixtureSpec, meta: dict[str, str], model_sha: str) -> str:
    flags = " ".join(spec.quantize_flags())
    return f"""# GPTQModel fixture `{spec.name}`

Written by GPTQModel, not by quantpress: quantpress's loader must reproduce `logits.safetensors`.

| setting | value |
|---|---|
| source model | `tests/peers/tiny_models.py` `{spec.arch}` (seed {SOURCE_SEED}, fp32, tied embeddings) |
| bits / group_size | {spec.bits} / {spec.group_size} |
| desc_act / sym | {spec.desc_act} / {spec.sym} |
| checkpoint_format | `{spec.fmt}` |
| damp_percent | {DAMP} (act_group_aware off, mse 0, static_groups off, RTN fallback off) |
| calibration | `calibration_ids({CALIB_N}, {CALIB_SEQLEN}, seed={CALIB_SEED})` = `../calibration.safetensors` |
| eval input_ids | `eval_ids({EVAL_N}, {EVAL_SEQLEN}, seed={EVAL_SEED})` = `input_ids.safetensors` |
| checkpoint/model.safetensors sha256 | `{model_sha}` |

Tool versions (peer venv): gptqmodel {meta.get("gptqmodel")}, optimum {meta.get("optimum")},
transformers {meta.get("transformers")}, torch {meta.get("torch")}.

Logits: transformers `AutoModelForCausalLM.from_pretrained(dir, quantization_config=GPTQConfig(bits={spec.bits},
backend="gptq_torch"), dtype=torch.float32, device_map="cpu")`; kernel `{meta.get("kernels")}`,
forward in `{meta.get("forward_dtype")}`, but the weights are dequantized in `{meta.get("scales_dtype")}`
(the dtype of the `scales` buffer), then cast to fp32 for the matmul.

Exact commands (`$PEER` = GPTQModel venv python, `$SRC` = the saved tiny model, run from a scratch cwd):
```
python -c "import tiny_models; tiny_models.save_tiny_model('$SRC', '{spec.arch}', seed={SOURCE_SEED})"
GPTQMODEL_CPU_WORKERS=2 $PEER tests/peers/gptqmodel_quantize.py $SRC $OUT {flags} --examples calibration.safetensors
# keep {", ".join(KEPT_FILES)} of $OUT as checkpoint/ (quant_log.csv holds timings)
GPTQMODEL_CPU_WORKERS=2 $PEER tests/peers/gptqmodel_logits.py checkpoint input_ids.safetensors logits.safetensors --dtype float32
```
All of this is what `tests/peers/regenerate_fixtures.py --only {spec.name}` does.
"""


def index_markdown() -> str:
    rows = "\n".join(
        f"| `{f.name}` | {f.arch} | {f.bits} | {f.group_size} | {f.desc_act} | {f.sym} | `{f.fmt}` |"
        for f in FIXTURES
    )
    return f"""# GPTQModel-written fixtures

Each `<name>/` holds `checkpoint/` (the GPTQ folder exactly as GPTQModel saved it, minus
`quant_log.csv`), `input_ids.safetensors`, `logits.safetensors` (transformers + GPTQModel's
`gptq_torch` kernel, fp32 forward, fp16 dequantization) and a `FIXTURE.md` with the exact commands
and tool versions. `calibration.safetensors` holds the windows every fixture was calibrated on.
`tests/test_interop_gptqmodel.py` checks quantpress's loader against them; rebuild with

    QUANTPRESS_PEER_GPTQMODEL_PYTHON=/path/to/gptqmodel-venv/bin/python \\
        python tests/peers/regenerate_fixtures.py [--only NAME ...]

The same variable enables the `peer` tests (`pytest -m peer`). Peer venv, CPU only (GPTQModel's
metadata asks for a newer torch that would pull CUDA wheels, hence the constraint and --no-deps):

    python3 -m venv gm && gm/bin/pip install torch==2.13.0 && echo torch==2.13.0 > constraints.txt
    gm/bin/pip install -c constraints.txt "accelerate>=1.15.0" "numpy>=2.4.6" "safetensors>=0.8.0" \\
      "filelock>=4.2.4" "transformers>=5.20.2" "threadpoolctl>=3.7.0" "packaging>=26.3" \\
      "device-smi>=0.5.7" "protobuf>=7.36.2" "pillow>=13.0.0" "requests>=2.34.2" "pypcre>=0.6.4" \\
      "tokenicer>=0.0.14" "logbar>=0.4.15" "jinja2>=3.1.6" "ninja>=1.13.2" "maturin>=1.15.0" \\
      "datasets>=5.1.0" "pyarrow>=26.0.0" "dill>=0.4.1" "torchao>=0.18.0" "defuser>=0.0.28"
    gm/bin/pip install -c constraints.txt --no-deps gptqmodel==7.7.0
    gm/bin/pip install -c constraints.txt optimum==2.3.0 tokenizers

GPTQModel compiles CPU kernels into ~/.cache/gptqmodel on first use (~30 s) and needs
GPTQMODEL_CPU_WORKERS=2 on a 2-core machine (the scripts set it).

| name | arch | bits | group_size | desc_act | sym | checkpoint_format |
|---|---|---|---|---|---|---|
{rows}
"""


def build_fixture(python: str, spec: FixtureSpec, dest: Path, work: Path, calib: Path) -> dict:
    """Quantize + reference logits for one spec into `dest` (replaced). Returns the logits meta."""
    src = work / f"src_{spec.arch}"
    if not src.exists():
        tiny_models.save_tiny_model(src, spec.arch, seed=SOURCE_SEED)
    out = work / spec.name
    shutil.rmtree(out, ignore_errors=True)
    gptqmodel_quantize(python, src, out, spec, calib)

    # The checkpoint sits in its own subfolder: loaders that glob *.safetensors (vLLM, quantpress)
    # would otherwise take input_ids/logits for weight shards.
    staged = work / f"{spec.name}.staged"
    shutil.rmtree(staged, ignore_errors=True)
    (staged / CHECKPOINT_SUBDIR).mkdir(parents=True)
    for name in KEPT_FILES:
        shutil.copy2(out / name, staged / CHECKPOINT_SUBDIR / name)
    ids = write_ids(staged / "input_ids.safetensors", tiny_models.eval_ids(EVAL_N, EVAL_SEQLEN, EVAL_SEED))
    meta = gptqmodel_logits(python, staged / CHECKPOINT_SUBDIR, ids, staged / "logits.safetensors")
    model_sha = sha256(staged / CHECKPOINT_SUBDIR / "model.safetensors")
    (staged / "FIXTURE.md").write_text(fixture_markdown(spec, meta, model_sha))

    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), str(dest))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=sorted(FIXTURES_BY_NAME), help="fixture names")
    p.add_argument("--out", type=Path, default=FIXTURES_DIR)
    args = p.parse_args(argv)
    if peer_python() is None:
        p.error(f"set {PEER_ENV_VAR} to the GPTQModel venv's python")
    python = require_peer_python()
    specs = [FIXTURES_BY_NAME[n] for n in args.only] if args.only else list(FIXTURES)

    args.out.mkdir(parents=True, exist_ok=True)
    calib = write_ids(args.out / "calibration.safetensors",
                      tiny_models.calibration_ids(CALIB_N, CALIB_SEQLEN, CALIB_SEED))
    (args.out / "FIXTURE.md").write_text(index_markdown())
    with tempfile.TemporaryDirectory(prefix="qp_fixtures_") as tmp:
        for spec in specs:
            meta = build_fixture(python, spec, args.out / spec.name, Path(tmp), calib)
            print(f"{spec.name}: {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
