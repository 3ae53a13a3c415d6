"""Every command and Python snippet of README.md runs, as a user types it (issue 22 row 1).

The fenced blocks are read from README.md itself, so an edit of the README is tested as written:

- `bash` blocks: every line runs in one workspace (a temp folder holding the repository's
  configs, the folders the README names and whatever earlier lines wrote), with string paths as
  typed, through `medgen.cli.main` (the console script's function) or, for `accelerate launch`,
  `make` and `python`, as a process. A line that reads the output of another line (`--run
  runs/ldm2d`) runs after it. Lines too large for 2 CPU cores get documented options appended
  (`SMALL`: e.g. `train.max_steps=2`, `--n 4`; later options win), nothing else changes. Lines
  that need GPUs, several machines or a placeholder (`DATA`) are checked the sensible way (`plan`).
- `python` blocks run with `exec` in the same workspace; names a snippet leaves to the reader
  (`train`, `holdout`, ... tensors) are bound to images of the workspace.
- blocks without a language: synopses (`medgen eval --real DIR ...`) must name only options the
  command accepts, with choices it accepts; `medgen: error:` lines must be printed verbatim by
  the command they describe.
- `yaml` blocks are checked against the config schema; a block of data-card fields only (a
  release's `card.yaml`) against the card's fields, and it must name every one.

The 2D latent run (runs/ldm2d) and 2D pixel run (runs/dm2d) come from the README's own lines;
3D latent and pixel runs from the commands in configs/demo_diffusion_3d.yaml's header. The
Python sampling snippet runs on all four.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


# --------------------------------------------------------------------------- the README's blocks


@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    section: str


def readme_blocks(path: Path = README) -> list[Block]:
    blocks, section, lang, start, body = [], "", None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if lang is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), i, []
            else:
                blocks.append(Block(lang, "\n".join(body), start, section))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


@dataclass
class Command:
    text: str  # the line as typed, comment removed
    line: int
    section: str
    argv: list[str] = field(default_factory=list)
    comment: str = ""  # what follows `#` on the line
    shown: str = ""  # output the README shows under it, as a comment line (`autoencoder: peak ...`)

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:70]}"


SHOWN_OUTPUT = re.compile(r"^[\w.-]+: ")  # a comment line that is a program's output, not prose


def bash_commands() -> list[Command]:
    out: list[Command] = []
    for block in (b for b in readme_blocks() if b.lang == "bash"):
        previous = None
        for offset, raw in enumerate(block.text.splitlines(), 1):
            if raw.lstrip().startswith("#"):
                comment = raw.lstrip()[1:].strip()
                if previous is not None and SHOWN_OUTPUT.match(comment):
                    previous.shown = comment
                previous = None
                continue
            text, _, comment = raw.partition("  #")
            if text.strip():
                previous = Command(text.strip(), block.line + offset, block.section, shlex.split(text), comment.strip())
                out.append(previous)
    return out


def python_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang == "python"]


def plain_lines() -> list[tuple[int, str]]:
    """Lines of blocks without a language, continuation lines (indented) joined to the line above."""
    out: list[tuple[int, str]] = []
    for block in (b for b in readme_blocks() if b.lang == ""):
        for offset, raw in enumerate(block.text.splitlines(), 1):
            if raw.startswith(" ") and out:
                out[-1] = (out[-1][0], out[-1][1] + " " + raw.strip())
            elif raw.strip():
                out.append((block.line + offset, raw.strip()))
    return out


# --------------------------------------------------------------------------- how each line runs

# Documented options appended to a line that would take too long on 2 CPU cores as typed.
SMALL_COHORT = {"2": ["--n", "24"], "3": ["--n", "8", "--size", "16"]}
SMALL_TRAIN = {"autoencoder": ["train.max_steps=2", "train.batch_size=4", "train.val_batches=1"],
               "diffusion": ["train.max_steps=2", "train.batch_size=4", "sample.n_preview=2", "sample.steps=2",
                             "model.channels=[16,32]", "model.attention_levels=[false,true]", "model.head_channels=16"]}
SMALL = {
    "sample": ["--n", "4"],
    "eval": ["--metrics", "fid,kid,msssim"],  # 4 samples: precision/recall's k=5 neighbours need 6
    "probe train-surrogate": ["train.steps=2"],
    "probe mri": ["--steps", "2", "--attack-steps", "2", "--n-images", "2", "--posterior-samples", "1", "--eps", "0,0.02",
                  "--acceleration", "4"],
    "python eval/probe_table.py": ["--subjects", "24", "--size", "32", "--prior-steps", "2", "--surrogate-steps", "2",
                                   "--n-images", "2", "--posterior-samples", "1", "--steps", "2", "--attack-steps", "2",
                                   "--tv-iterations", "2", "--eps", "0,0.02"],
}
# The same for Python snippets: (as written, replaced by) where a snippet names a size; the SSL copy
# detector a snippet trains without naming its steps trains DETECTOR_STEPS (the Python side of `--steps N`).
SMALL_PYTHON = [("n=1000", "n=8")]
DETECTOR_STEPS = 20
# Lines that cannot run here as typed are checked the sensible way (`plan`):
# - `make demo` / `make test`: `make -n`, the target exists (the demo and the suite are tested on their own);
# - `accelerate launch` on GPUs: accelerate's parser takes the launcher options; the medgen command runs on
#   one CPU process (two machines writing to /shared: medgen's parser takes it);
# - training on a paper-sized config or on the placeholder DATA: the config resolves (`medgen config show`).
PAPER_SIZED = r"^medgen train \w+ --config configs/(medical_diffusion|medfusion)_\w+\.yaml --out "
# Marked slow (the rest of the file takes about a minute on 2 cores): GPU-sized memory estimates, the
# probe, two launched processes, and anything on the 3D runs (three more trainings).
SLOW = [r"--estimate-memory", r"^python eval/probe_table\.py", r"^accelerate launch --multi_gpu --num_processes 2 ", r"probe",
        r"runs/(ldm|dm)3d\b"]


def _subcommand(argv: list[str]) -> str:
    """`medgen data synth-brain --out ...` -> "data synth-brain"; `medgen sample --run ...` -> "sample"."""
    return " ".join(itertools.takewhile(lambda a: not a.startswith("-") and "=" not in a and "/" not in a, argv[1:3]))


def small_options(argv: list[str]) -> list[str]:
    """What `SMALL` appends to a `medgen ...` line."""
    sub = _subcommand(argv)
    if sub == "data synth-brain":
        return SMALL_COHORT[argv[argv.index("--dims") + 1]]
    if sub.startswith("train ") and "--estimate-memory" not in argv:
        return SMALL_TRAIN[argv[2]] + (["train.max_steps=3"] if "--resume" in argv else [])  # a resumed run goes on by one step
    return SMALL.get(sub, [])


def _paths(argv: list[str]) -> list[str]:
    """Relative paths a line names: option values and key=value values."""
    values = [a.split("=", 1)[1] if "=" in a and not a.startswith("-") else a for a in argv[1:]]
    return [v.rstrip("/") for v in values if ("/" in v or v.endswith(".yaml")) and not v.startswith(("/", "-", "configs/"))]


def _out(argv: list[str]) -> str | None:
    return argv[argv.index("--out") + 1].rstrip("/") if "--out" in argv else None


# --------------------------------------------------------------------------- the workspace


@dataclass
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout: {self.out[-3000:]}\nstderr: {self.err[-3000:]}"


class Workspace:
    """One folder where the README's lines run in a user's order; each line runs once."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, Result] = {}
        (root / "configs").mkdir()  # a user's checkout: the repository's configs (and configs/my.yaml, the README's example)
        for f in (REPO / "configs").iterdir():
            (root / "configs" / f.name).symlink_to(f)
        for folder in ("eval", "scripts"):
            (root / folder).symlink_to(REPO / folder)
        self.producers: dict[str, Command] = {}  # output folder -> the first README line that writes it
        for c in bash_commands():
            if _out(c.argv) and plan(c.argv)[0] in ("process", "medgen"):
                self.producers.setdefault(_out(c.argv), c)

    @contextlib.contextmanager
    def inside(self):
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            yield
        finally:
            os.chdir(cwd)

    def medgen(self, argv: list[str]) -> Result:
        """`medgen ARGS` in this process (the console script calls `medgen.cli.main`)."""
        from medgen.cli import main

        out, err = io.StringIO(), io.StringIO()
        with self.inside(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse: an unknown option, a bad choice
                code = e.code
        return Result(code, out.getvalue(), err.getvalue())

    def process(self, argv: list[str], timeout: int = 600) -> Result:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        proc = subprocess.run(argv, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def needs(self, argv: list[str], comment: str = "") -> None:
        """Make what a line reads: another README line's output, a folder the README names, or a
        config file the line's comment spells out (`--config probe_data.yaml   # data: {...}`)."""
        for path in _paths(argv):
            if path == _out(argv) or (self.root / path).exists():
                continue
            if path in self.producers:
                result = self.run(self.producers[path])
                assert result.code == 0, f"`{self.producers[path].text}`, which writes {path}, failed:\n{result}"
            elif path in PREPARED:
                PREPARED[path](self)
            elif path.endswith(".yaml") and comment:
                (self.root / path).write_text(comment + "\n")

    def run(self, cmd: Command) -> Result:
        if cmd.text not in self.results:
            self.results[cmd.text] = self.execute(cmd.argv, cmd.comment)
        return self.results[cmd.text]

    def execute(self, argv: list[str], comment: str = "") -> Result:
        kind, args, launcher = plan(argv)
        if launcher:
            _check_launcher(launcher)
        if kind == "parse":
            _parse(args)
            return Result(0, "", "")
        self.needs(args if kind == "process" else ["medgen", *args], comment)
        return self.process(args) if kind == "process" else self.medgen(args)


def plan(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """How a README line runs here: (kind, arguments, accelerate launcher options to check).

    kind: "process" (a process, as typed), "medgen" (`medgen.cli.main(arguments)`), "parse"
    (medgen's parser only), "config" (`medgen config show` in place of a GPU-sized training)."""
    if argv[0] == "make":
        return "process", ["make", "-n", "-C", str(REPO), *argv[1:]], []
    if argv[0] == "python":
        return "process", [sys.executable, *argv[1:], *SMALL.get(" ".join(argv[:2]), [])], []
    if argv[0] == "accelerate":
        launcher, medgen = argv[2 : argv.index("-m")], ["medgen", *argv[argv.index("-m") + 2 :]]
        if "--device" in medgen and "cpu" in medgen:  # CPU processes: runs here, as typed
            return "process", [*argv[:2], *launcher, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "-m", "medgen", *medgen[1:], *small_options(medgen)], []
        if "--config_file" in launcher:  # two machines writing to /shared
            return "parse", medgen[1:], launcher
        kind, args, _ = plan(medgen)
        return kind, args, launcher
    if re.search(PAPER_SIZED, " ".join(argv)):
        return "config", _config_show(argv), []
    return "medgen", [*argv[1:], *small_options(argv)], []


def _config_show(argv: list[str]) -> list[str]:
    """`medgen train STAGE --config X ... key=value` as `medgen config show`, DATA filled in with a
    README cohort of the config's dimensionality, outputs of other GPU lines left out."""
    config = argv[argv.index("--config") + 1]
    dims = 3 if "3d" in config else 2
    overrides = [a.replace("=DATA", f"={COHORT[dims]}") for a in argv[3:] if "=" in a and not a.startswith("-")]
    return ["config", "show", argv[2], "--config", config, *[o for o in overrides if not o.startswith("autoencoder.run=")]]


def _check_launcher(options: list[str]) -> None:
    """accelerate's own parser takes the launcher options."""
    from accelerate.commands.launch import launch_command_parser

    launch_command_parser().parse_args([*options, "-m", "medgen"])


def _parse(args: list[str]) -> None:
    from medgen.cli import build_parser

    build_parser().parse_args(args)


COHORT = {2: "runs/cohort2d", 3: "data/brain3d"}  # the README's own cohorts stand in for DATA


def _demo_cohort(ws: Workspace) -> None:
    """runs/demo/cohort: the cohort `make demo` writes (a small one)."""
    assert ws.medgen(["data", "synth-brain", "--out", "runs/demo/cohort", "--n", "24", "--dims", "2", "--size", "32", "--seed", "0"]).code == 0


def _config_header_commands(config: str) -> dict[str, list[str]]:
    """`--out` -> argv of the commands documented in a config file's header."""
    lines = [ln.lstrip("# ").strip() for ln in (REPO / "configs" / config).read_text().splitlines() if ln.startswith("#   medgen")]
    return {_out(shlex.split(ln)): shlex.split(ln) for ln in lines}


def _runs_3d(ws: Workspace) -> None:
    """runs/ae3d (the 3D demo autoencoder on the README's 3D cohort), then runs/ldm3d and runs/dm3d
    as configs/demo_diffusion_3d.yaml's header documents them."""
    ws.run(next(c for c in bash_commands() if _out(c.argv) == "data/brain3d"))
    if not (ws.root / "runs/ae3d").exists():
        r = ws.medgen(["train", "autoencoder", "--config", "configs/demo_autoencoder_3d.yaml", "--out", "runs/ae3d",
                       "data.path=data/brain3d", *SMALL_TRAIN["autoencoder"]])
        assert r.code == 0, r
    for out, argv in _config_header_commands("demo_diffusion_3d.yaml").items():
        if not (ws.root / out).exists():
            argv = [a.replace("COHORT3D", "data/brain3d") for a in argv]
            r = ws.medgen([*argv[1:], *SMALL_TRAIN["diffusion"]])
            assert r.code == 0, r


def _training_split(ws: Workspace) -> None:
    """data/train and data/holdout: runs/ldm2d's training and held-out images (its split.json)."""
    import json

    ws.run(ws.producers["runs/ldm2d"])
    files = json.loads((ws.root / "runs/ldm2d/split.json").read_text())["files"]
    for name in ("train", "holdout"):
        (ws.root / "data" / name).mkdir(parents=True)
        for f in files[name]:
            shutil.copy(ws.root / f if not Path(f).is_absolute() else f, ws.root / "data" / name)


PREPARED = {"runs/demo/cohort": _demo_cohort, "runs/ldm3d": _runs_3d, "runs/dm3d": _runs_3d, "data/train": _training_split,
            "data/holdout": _training_split}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("readme"))


# --------------------------------------------------------------------------- tests: bash lines


def _marks(cmd: Command):
    slow = any(re.search(p, cmd.text) for p in SLOW) and plan(cmd.argv)[0] != "parse"
    return [pytest.mark.slow] if slow else []


@pytest.mark.parametrize("cmd", [pytest.param(c, id=c.id, marks=_marks(c)) for c in bash_commands()])
def test_readme_command_runs(cmd, ws):
    result = ws.run(cmd)
    assert result.code == 0, f"README line {cmd.line} `{cmd.text}` failed:\n{result}"
    if cmd.shown:  # the output the README shows under the line
        assert cmd.shown in (result.out + result.err).splitlines(), f"README line {cmd.line + 1} shows `{cmd.shown}`; the command printed:\n{result}"
    out = _out(cmd.argv)
    if out and plan(cmd.argv)[0] in ("medgen", "process"):
        assert (ws.root / out).exists(), f"README line {cmd.line} wrote no {out}"


def test_a_renamed_option_fails_its_line(ws):
    """What the tests above rely on: a line whose option no longer exists fails (exit 2, named)."""
    result = ws.execute(shlex.split("medgen config show autoencoder --konfig configs/demo_autoencoder_2d.yaml"))
    assert result.code == 2 and "--konfig" in result.err


def test_every_readme_line_has_a_plan():
    """A line no rule knows would go untested: each starts with a program `plan` handles."""
    for cmd in bash_commands():
        assert cmd.argv[0] in ("medgen", "accelerate", "make", "python"), f"README line {cmd.line}: no rule runs `{cmd.text}`"
        assert plan(cmd.argv)[0] in ("process", "medgen", "parse", "config")


# --------------------------------------------------------------------------- tests: python snippets


def _placeholders(ws: Workspace) -> dict:
    """Tensors for the names a snippet leaves to the reader: runs/ldm2d's training and held-out
    images, its samples (samples/ldm2d) as the synthetic set and later rounds."""
    from medgen.data import load_images

    ws.needs(["python", "data/train", "samples/ldm2d"])
    train, _ = load_images(ws.root / "data/train")
    holdout, _ = load_images(ws.root / "data/holdout")
    synthetic, _ = load_images(ws.root / "samples/ldm2d")
    return {"train": train, "holdout": holdout, "synthetic": synthetic, "extra_samples": synthetic[:2]}


def _exec(ws: Workspace, code: str, names: dict | None = None) -> dict:
    namespace = {"__name__": "__readme__", **(names or {})}
    with ws.inside():
        exec(compile(code, str(README), "exec"), namespace)
    return namespace


def _snippet_inputs(code: str) -> list[str]:
    return [m for m in re.findall(r"[\"']([\w./-]+/?)[\"']", code) if "/" in m]


def _python_param(block: Block):
    slow = any(word in block.text for word in ("make_release", "run_audit", "CopyAudit"))
    return pytest.param(block, id=f"L{block.line}:{block.section[:40]}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("block", [_python_param(b) for b in python_blocks()])
def test_readme_python_snippet_runs(block, ws, monkeypatch):
    monkeypatch.setattr("medgen.privacy.detector.default_steps", lambda n_images, batch_size: DETECTOR_STEPS)
    ws.needs(["python", *_snippet_inputs(block.text)])
    names = _placeholders(ws) if re.search(r"\b(train|holdout|synthetic|extra_samples)\b(?![\"'/])", block.text) else {}
    documented = re.findall(r"raises (\w+)", block.text)  # an outcome the snippet's own comment announces
    code = block.text
    for written, small in SMALL_PYTHON:
        code = code.replace(written, small)
    try:
        _exec(ws, code, names)
    except Exception as e:
        if type(e).__name__ not in documented:
            raise


RUN_KINDS = [pytest.param("runs/ldm2d", id="2d-latent"),
             *[pytest.param(run, id=kind, marks=pytest.mark.slow) for run, kind in
               (("runs/dm2d", "2d-pixel"), ("runs/ldm3d", "3d-latent"), ("runs/dm3d", "3d-pixel"))]]


@pytest.mark.parametrize("run", RUN_KINDS[1:])  # runs/ldm2d: the snippet as written, in test_readme_python_snippet_runs
def test_readme_sampling_snippet_on_2d_3d_pixel_and_latent_runs(run, ws):
    """The README's `load_pipeline` snippet, as typed, on the other kinds of run (string paths)."""
    block = next(b for b in python_blocks() if "load_pipeline(" in b.text)
    documented_run = re.search(r"load_pipeline\(\"([^\"]+)\"\)", block.text).group(1)
    ws.needs(["python", run])
    ns = _exec(ws, block.text.replace(documented_run, run))
    x, pipe = ns["x"], ns["pipe"]
    assert x.shape[0] == 16 and x.ndim == pipe.spatial_dims + 2 and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("run", RUN_KINDS)
def test_readme_sample_command_on_2d_3d_pixel_and_latent_runs(run, ws, tmp_path):
    """`medgen sample --run RUN --n 4 --out S` (issue 22 row 1) on every kind of run, string paths."""
    ws.needs(["medgen", run])
    result = ws.medgen(["sample", "--run", run, "--n", "4", "--out", str(tmp_path / "S"), "--steps", "2"])
    assert result.code == 0, f"{run}: {result}"
    assert len(list((tmp_path / "S").glob("sample_0000*"))) == 4


# --------------------------------------------------------------------------- tests: synopses, errors, yaml


def _subparser(argv: list[str]):
    """The argparse parser of `medgen WORDS ...` and the words that named it."""
    from medgen.cli import build_parser

    parser = build_parser()
    for word in argv[1:]:
        sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
        if sub is None or word.split("|")[0] not in sub.choices:
            break
        parser = sub.choices[word.split("|")[0]]
    return parser


SYNOPSES = [(n, ln) for n, ln in plain_lines() if ln.startswith("medgen ") and not ln.startswith("medgen:")]


@pytest.mark.parametrize("line", [pytest.param(ln, id=f"L{n}:{ln[:60]}") for n, ln in SYNOPSES])
def test_readme_synopsis_names_only_real_options(line):
    words = line.split("  #")[0].replace("[", " ").replace("]", " ").split()
    parser = _subparser(words)
    options = {s: a for a in parser._actions for s in a.option_strings}
    assert parser.prog != "medgen" or len(words) == 1, f"`{line}`: no such command"
    for i, word in enumerate(words):
        for flag in (f for f in word.split("/") if f.startswith("--")):
            assert flag in options, f"`{line}`: {parser.prog} has no option {flag}"
            action = options[flag]
            if action.choices and i + 1 < len(words) and not words[i + 1].startswith("-"):
                for choice in words[i + 1].split("|"):
                    assert choice in [str(c) for c in action.choices], f"`{line}`: {flag} does not accept {choice}"


ERRORS = [(n, ln) for n, ln in plain_lines() if ln.startswith("medgen: error:")]


def _command_for_error(message: str, ws: Workspace) -> list[str]:
    """The command a README error line describes (the key and value it names)."""
    if m := re.fullmatch(r"(configs/[\w.]+): unknown config key ([\w.]+); did you mean [\w.]+\?", message):
        section, key = m.group(2).split(".", 1)
        path = ws.root / m.group(1)
        path.unlink(missing_ok=True)
        path.write_text(f"{section}:\n  {key}: 1\n")
        return ["config", "show", "autoencoder", "--config", m.group(1)]
    if m := re.fullmatch(r"unknown config key ([\w.]+); did you mean [\w.]+\?", message):
        return ["config", "show", "autoencoder", f"{m.group(1)}=1"]
    if m := re.fullmatch(r"([\w.]+=\S+): expected .*", message):
        return ["config", "show", "autoencoder", m.group(1)]
    if m := re.fullmatch(r"autoencoder\.run: (\S+) does not exist", message):
        return ["train", "diffusion", "--config", "configs/demo_diffusion_2d.yaml", "--out", "runs/never", f"autoencoder.run={m.group(1)}"]
    raise AssertionError(f"README error line `{message}`: tell this test which command prints it")


@pytest.mark.parametrize("line", [pytest.param(ln, id=f"L{n}:{ln[15:60]}") for n, ln in ERRORS])
def test_readme_error_lines_are_printed_verbatim(line, ws):
    result = ws.medgen(_command_for_error(line.removeprefix("medgen: error: "), ws))
    assert result.code != 0 and line in result.err.splitlines(), f"README shows `{line}`; the command printed:\n{result}"


@pytest.mark.parametrize("block", [pytest.param(b, id=f"L{b.line}") for b in readme_blocks() if b.lang == "yaml"])
def test_readme_yaml_is_a_valid_config(block, tmp_path):
    import yaml

    from medgen.config import load_config
    from medgen.release.steward import CARD_FIELDS, load_card_fields, missing_fields
    from medgen.train.autoencoder import DEFAULTS

    if set(yaml.safe_load(block.text)) <= set(CARD_FIELDS):  # `medgen release --card card.yaml`
        (tmp_path / "card.yaml").write_text(block.text)
        assert missing_fields(load_card_fields(tmp_path / "card.yaml")) == []
        return
    (tmp_path / "data").mkdir()
    text = re.sub(r"path: \S+", f"path: {tmp_path / 'data'}", block.text)  # the example's /data/brain_mri
    (tmp_path / "x.yaml").write_text(text)
    cfg = load_config(tmp_path / "x.yaml", [], DEFAULTS)
    for key in re.findall(r"^  (\w+):", block.text, re.M):
        assert key in cfg.data, key


def test_readme_blocks_are_found():
    """The extraction sees the README's blocks (a changed fence style would silently skip them)."""
    langs = [b.lang for b in readme_blocks()]
    assert langs.count("bash") >= 5 and langs.count("python") >= 3 and "yaml" in langs and "" in langs
    assert any(c.argv[:2] == ["medgen", "sample"] for c in bash_commands())
