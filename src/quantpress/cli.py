"""The `quantpress` command: a thin layer over quantpress.api. Errors are translated here only."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantpress import api, prompts
from quantpress.config import CalibrationConfig, ChatConfig, Method, QuantConfig, recommended, variant_name
from quantpress.errors import QuantpressError
from quantpress.formats.hf_folder import read_json
from quantpress.runtime.sampling import MAX_SEED, SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quantize LLMs into GPTQ checkpoints every loader reads; evaluate and run them.")
console = Console(stderr=True)
DEFAULT_Q, DEFAULT_C, DEFAULT_S = QuantConfig(), CalibrationConfig(), SamplingParams()  # plain fields' defaults


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _eval_with_bar(model, dataset: str, seqlen: Optional[int], label: str, max_windows: Optional[int]) -> api.EvalResult:
    with _progress() as bar:
        task = bar.add_task(f"perplexity {label}", total=None)
        return api.evaluate(model, dataset, seqlen, max_windows=max_windows,
                            on_window=lambda done, total: bar.update(task, completed=done, total=total))


def _chat_config(template: Optional[str], system_prompt: Optional[str]) -> ChatConfig:
    if template is not None:
        prompts.prompt_template(template)  # an unknown name fails before any work
    return ChatConfig(template, system_prompt)


@app.command()
def quantize(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Hugging Face model folder (default: the bundled tiny Llama)")] = None,
    out_dir: Annotated[Optional[Path], typer.Argument(help="Output folder (default: quantpress-out/<model>-<variant>)")] = None,
    bits: int = typer.Option(DEFAULT_Q.bits, help="2, 3, 4 or 8"),
    group_size: int = typer.Option(DEFAULT_Q.group_size, help="-1 for one group per row"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order",
                                             help="quantize columns by importance (recommended: on, static)"),
    sym: bool = typer.Option(DEFAULT_Q.sym, "--sym/--asym"),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--no-static-groups",
                                                 help="group grids from the original weight; with act-order: "
                                                      "a plain, trivial-g_idx checkpoint (recommended: on)"),
    true_sequential: bool = typer.Option(DEFAULT_Q.true_sequential, "--true-sequential/--no-true-sequential"),
    damp: float = typer.Option(DEFAULT_Q.damp_percent, help="damp_percent"),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="search the clipping range (recommended: on)"),
    mse_weighted: Optional[bool] = typer.Option(None, "--mse-weighted/--no-mse-weighted",
                                      help="weight the range search by each input's mean square (needs --mse)"),
    group_aware: Optional[bool] = typer.Option(None, "--group-aware/--no-group-aware",
                                     help="GAR: quantize groups by importance, trivial g_idx"),
    damp_search: Optional[bool] = typer.Option(None, "--damp-search/--no-damp-search",
                                     help="pick damp per module by output error"),
    upgrade_budget: float = typer.Option(DEFAULT_Q.upgrade_budget, help="extra size (e.g. 0.02 = 2%) for storing "
                                         "the worst modules at 8 bits (GPTQModel/vLLM `dynamic`)"),
    method: Method = typer.Option(DEFAULT_Q.method, help="gptq; signround (GPTQ, then SignRound per layer: "
                                  "slower, best at 2-3 bits); or rtn (the baseline)"),
    signround_iters: int = typer.Option(DEFAULT_Q.signround_iters, min=1, help="SignRound steps per layer"),
    dataset: str = typer.Option(DEFAULT_C.dataset, help="wikitext2, tinyshakespeare, or a text file"),
    nsamples: int = typer.Option(DEFAULT_C.nsamples, min=1),
    seqlen: Optional[int] = typer.Option(None, min=2, help="default: min(2048, the model's context)"),
    seed: int = typer.Option(DEFAULT_C.seed, min=0, max=MAX_SEED),
    compute_dtype: str = typer.Option(DEFAULT_C.compute_dtype, help="calibration forwards: bfloat16 or float32"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="wikitext-2 perplexity before and after"),
    eval_windows: Optional[int] = typer.Option(None, min=1, help="evaluate on the first N windows only"),
    overwrite: bool = typer.Option(False, help="replace an output folder that quantpress wrote earlier"),
    prompt_template: Optional[str] = typer.Option(None, help="record the model's prompt format for chat/serve "
                                                  "(vicuna, llama-2-chat, chatml, ...)"),
    system_prompt: Optional[str] = typer.Option(None, help="record a default system prompt"),
) -> None:
    """Quantize a model folder into a GPTQ checkpoint (runs the bundled model when no folder is given)."""
    model_dir = model_dir or api.bundled_model_dir()
    config = read_json(model_dir / "config.json")
    # options left unset take the recommended levers (config.recommended); RTN gets none
    quant = recommended(bits=bits, group_size=group_size, act_order=act_order, sym=sym, static_groups=static_groups,
                        true_sequential=true_sequential, damp_percent=damp, mse=mse, mse_weighted=mse_weighted,
                        group_aware=group_aware, damp_search=damp_search, upgrade_budget=upgrade_budget,
                        method=method, signround_iters=signround_iters)
    calibration = CalibrationConfig(dataset, nsamples, seqlen or api.default_seqlen(config), seed, compute_dtype)
    out_dir = out_dir or Path("quantpress-out") / f"{model_dir.name}-{variant_name(quant)}"
    chat = _chat_config(prompt_template, system_prompt)
    api.preflight(model_dir, out_dir, quant, calibration, overwrite=overwrite)  # fail before any forward pass

    before = _eval_with_bar(model_dir, "wikitext2", None, "full precision", eval_windows) if evaluate else None
    with _progress() as bar:
        task = bar.add_task(f"quantizing {model_dir.name} ({variant_name(quant)})", total=None)

        def show(stage: str, done: int, total: int) -> None:
            if stage == "layer":  # the publish steps after the last layer are renames: no bar
                bar.update(task, completed=done, total=total)

        report = api.quantize(model_dir, out_dir, quant, calibration if quant.calibrated else None,
                              overwrite=overwrite, chat=chat, progress=show)
    after = _eval_with_bar(out_dir, "wikitext2", None, "quantized", eval_windows) if evaluate else None

    table = Table(title=f"quantpress {variant_name(quant)}")
    table.add_column("what")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("output", str(report.out_dir))
    table.add_row("checkpoint_format", report.checkpoint_format.value)
    table.add_row("time", f"{report.seconds:.1f} s" + (f" (resumed {report.resumed_layers} layers)" if report.resumed_layers else ""))
    table.add_row("size on disk", _human_size(report.size_bytes))
    if before and after:
        table.add_row(f"wikitext-2 ppl before (seqlen {before.seqlen})", f"{before.perplexity:.3f}")
        table.add_row("wikitext-2 ppl after", f"{after.perplexity:.3f}")
        table.add_row("change", f"{after.perplexity / before.perplexity - 1:+.2%}")
    Console().print(table)


@app.command("eval")
def eval_(
    model_dir: Path = typer.Argument(..., help="full-precision or GPTQ model folder"),
    dataset: str = typer.Option("wikitext2", help="wikitext2 (test split), tinyshakespeare, or a text file"),
    seqlen: Optional[int] = typer.Option(None, min=2, help="window length (default: min(2048, the model's context))"),
    max_windows: Optional[int] = typer.Option(None, min=1, help="evaluate on the first N windows only"),
    reference: Optional[Path] = typer.Option(None, help="full-precision folder: also report KL divergence and "
                                             "top-1 agreement to it, on the text in its chat format"),
) -> None:
    """Perplexity as the GPTQ paper computes it: non-overlapping windows, exp of mean NLL."""
    loaded = api.load(model_dir)
    result = _eval_with_bar(loaded, dataset, seqlen, model_dir.name, max_windows)
    print(f"{result.dataset} perplexity: {result.perplexity:.4f} "
          f"(seqlen {result.seqlen}, {result.windows} windows, {result.seconds:.1f} s)")
    if reference is not None:
        with _progress() as bar:
            task = bar.add_task(f"agreement with {reference.name}", total=None)
            agreement = api.compare(loaded, reference, dataset, seqlen, max_windows=max_windows,
                                    on_window=lambda done, total: bar.update(task, completed=done, total=total))
        print(f"KL to {reference.name}: {agreement.kl_divergence:.5f} nats/token, top-1 agreement "
              f"{agreement.top1:.2%} ({dataset} in the reference's chat format, {agreement.tokens} tokens)")


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="full-precision or GPTQ model folder"),
    prompt: str = typer.Option(..., help="text to complete"),
    max_new_tokens: int = typer.Option(DEFAULT_S.max_new_tokens, min=1),
    temperature: float = typer.Option(DEFAULT_S.temperature, help="0 for greedy"),
    top_p: float = typer.Option(DEFAULT_S.top_p),
    top_k: int = typer.Option(DEFAULT_S.top_k, help="0 disables"),
    repetition_penalty: float = typer.Option(DEFAULT_S.repetition_penalty),
    seed: Optional[int] = typer.Option(None, min=0, max=MAX_SEED),
) -> None:
    """Load a folder on CPU and print a completion of the prompt."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    completion = api.generate(model_dir, prompt, params)
    print(prompt + completion.text)
    console.print(f"[dim]{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}[/dim]")


@app.command("release")
def release_(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Hugging Face model folder (default: the bundled tiny Llama)")] = None,
    out_repo: Annotated[Optional[Path], typer.Argument(help="git repository to write, one branch per variant")] = None,
    recipe: Optional[Path] = typer.Option(None, help="recipe YAML (default: TheBloke's 7-variant set)"),
    shared_calibration: bool = typer.Option(
        False, "--shared-calibration/--sequential",
        help="one full-precision calibration pass for all variants (faster, not sequential GPTQ)"),
    merge_lora: Optional[Path] = typer.Option(None, help="merge this PEFT LoRA adapter into the model first"),
    eval_windows: Optional[int] = typer.Option(None, min=1, help="evaluate on the first N windows only"),
) -> None:
    """Quantize every variant of a recipe, measure each, and write a git repo with a branch per
    variant and a model card; re-running resumes or reuses finished variants."""
    from quantpress.release.build import EvalSettings, release
    from quantpress.release.recipe import ModelInfo, default_recipe, load_recipe

    model_dir = model_dir or api.bundled_model_dir()
    out_repo = out_repo or Path("quantpress-out") / f"{model_dir.name}-GPTQ"
    seqlen = api.default_seqlen(read_json(model_dir / "config.json"))
    if recipe is not None:
        plan = load_recipe(recipe, seqlen_default=seqlen)
    else:
        info = ModelInfo(name=model_dir.name, creator="unknown", original_model=model_dir.name)
        plan = default_recipe(info, seqlen=seqlen)
    with _progress() as bar:
        tasks: dict[tuple[str, str], int] = {}

        def show(stage: str, branch: str, done: int, total: int) -> None:
            key = (stage, branch)
            if key not in tasks:
                tasks[key] = bar.add_task(f"{stage} {branch}", total=total)
            bar.update(tasks[key], completed=done, total=total)

        report = release(model_dir, out_repo, plan, shared_calibration=shared_calibration,
                         evaluation=EvalSettings(max_windows=eval_windows), merge_lora=merge_lora, progress=show)
    table = Table(title=f"release {report.repo}")
    for column in ("branch", "bits", "GS", "act order", "size", "perplexity"):
        table.add_column(column, justify="left" if column == "branch" else "right", no_wrap=True)
    for r in report.results:
        table.add_row(r.branch, str(r.quant.bits), str(r.quant.group_size), str(r.quant.act_order),
                      _human_size(r.size_bytes), f"{r.perplexity:.3f}")
    Console().print(table)
    reused = len(report.results) - len(report.quantized)
    console.print(f"{report.seconds:.1f} s; {len(report.quantized)} variants quantized, {reused} reused")


@app.command()
def publish(
    repo: Path = typer.Argument(..., help="a repository written by `quantpress release`"),
    remote: str = typer.Option(..., help="any git remote: a URL or a path to a (bare) repository"),
    force: bool = typer.Option(False, help="overwrite remote branches that have diverged"),
) -> None:
    """Push every branch of a release to a git remote."""
    from quantpress.release.git import ReleaseRepo

    print(ReleaseRepo.open(repo).push(remote, force=force).strip())


@app.command()
def download(
    source: str = typer.Argument(..., help="ORG/MODEL[:BRANCH] on the Hub, or a git URL/path[:BRANCH]"),
    local_dir: Path = typer.Option(..., help="folder to write the branch's files into"),
    branch: Optional[str] = typer.Option(None, help="instead of the :BRANCH suffix"),
) -> None:
    """Fetch one branch of a release, resumably, verifying every file's hash."""
    from quantpress.release.download import download as fetch
    from quantpress.release.download import parse_source

    spec = parse_source(source, branch)
    with _progress() as bar:
        task = bar.add_task(f"downloading {spec}", total=None)

        def show(name: str, done: int, total: int) -> None:
            bar.update(task, description=f"downloading {name}", completed=done, total=total)

        report = fetch(spec, local_dir, progress=show)
    console.print(f"{spec} at {report.commit[:12]} -> {local_dir}: {len(report.written)} files fetched "
                  f"({_human_size(report.bytes_written)}), {len(report.verified)} already present and verified")
    if report.left_over:
        console.print(f"[yellow]kept files this branch does not have:[/yellow] {', '.join(report.left_over)}")


@app.command()
def chat(
    model_dir: Path = typer.Argument(..., help="full-precision or GPTQ model folder"),
    system: Optional[str] = typer.Option(None, help="system prompt (default: the recorded one, else the template's)"),
    template: Optional[str] = typer.Option(None, help="prompt format (default: the tokenizer's chat_template, "
                                           "else the one recorded in quantize_config.json)"),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(DEFAULT_S.temperature, help="0 for greedy"),
    top_p: float = typer.Option(DEFAULT_S.top_p),
    top_k: int = typer.Option(DEFAULT_S.top_k, help="0 disables"),
    repetition_penalty: float = typer.Option(DEFAULT_S.repetition_penalty),
    seed: Optional[int] = typer.Option(None, min=0, max=MAX_SEED),
) -> None:
    """Chat in the terminal: replies stream as they are generated; /reset starts over, /exit or EOF ends."""
    from quantpress.prompts import chat_formatter
    from quantpress.runtime.chat import chat_loop

    loaded = api.load(model_dir)
    formatter = chat_formatter(loaded, template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    console.print(f"[dim]{model_dir.name}, prompt format {formatter.name}; /reset, /exit[/dim]")

    def read() -> Optional[str]:
        try:
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C end the chat cleanly
            print()
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(loaded, formatter, params, system=system, read=read, write=write)


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="full-precision or GPTQ model folder"),
    host: str = typer.Option("127.0.0.1", help="0.0.0.0 to listen on every interface"),
    port: int = typer.Option(8080),
    model_id: Optional[str] = typer.Option(None, help="name in /info and OpenAI responses (default: the folder name)"),
    max_input_tokens: Optional[int] = typer.Option(None, help="default: the model's context - 1"),
    max_total_tokens: Optional[int] = typer.Option(None, help="input + new tokens (default: the model's context)"),
    max_concurrent_requests: int = typer.Option(128, help="running + waiting; more get 429"),
    max_batch_size: int = typer.Option(16, help="sequences decoded together"),
    template: Optional[str] = typer.Option(None, help="chat prompt format for /v1/chat/completions"),
    batch_invariant: bool = typer.Option(False, help="a seeded request gives bitwise the same text alone and "
                                         "under load (fixed GEMM shapes; ~2x slower single stream)"),
    max_request_bytes: Optional[int] = typer.Option(None, min=1, help="larger bodies get 413 (default: 64 bytes "
                                                    "per input token, at least 2 MB)"),
    validation_workers: int = typer.Option(2, min=1, help="threads that tokenize and render chat templates"),
) -> None:
    """Serve a model over HTTP: TGI routes (/generate, /generate_stream, ...) and OpenAI routes (/v1/...)."""
    from quantpress.server.app import ServerSettings, serve as run_server

    settings = ServerSettings(model_id=model_id or model_dir.name, max_input_tokens=max_input_tokens,
                              max_total_tokens=max_total_tokens, max_concurrent_requests=max_concurrent_requests,
                              max_batch_size=max_batch_size, template=template, batch_invariant=batch_invariant,
                              max_request_bytes=max_request_bytes, validation_workers=validation_workers)
    run_server(model_dir, host, port, settings)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except QuantpressError as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            console.print(f"[red]error:[/red] disk full while writing {e.filename or ''}: nothing finished was "
                          "lost; free space and re-run the same command to resume")
            sys.exit(2)
        # Anything else the OS refused (permissions, a read-only mount) is the user's to fix too:
        # say what and where, without a traceback. Finished work is never lost: outputs are staged.
        console.print(f"[red]error:[/red] {e.strerror or e}: {e.filename or ''}")
        sys.exit(2)


if __name__ == "__main__":
    main()
