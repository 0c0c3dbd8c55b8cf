"""The `interplab` command as a whole: one set of conventions (checked on every command's
options) and one error path (every command with bad input: one line, exit 2, no traceback)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from interplab.cli import app
from interplab.cli.errors import InterplabGroup, user_error_message
from interplab.cli.options import CONTEXT_LENGTH, DEFAULT_MODEL, MAX_NEW_TOKENS, N_PROMPTS, POSITIONS

runner = CliRunner()

# one name per idea: these spellings were used once and must not come back
RETIRED = {"--n", "--tokens", "--layer", "--multipliers", "--alpha", "--limit", "--strength"}
# a short flag means one thing everywhere
SHORT = {"-m": "--model", "-o": "--out", "-n": "--max-new-tokens", "-s": "--scale", "-l": "--layers",
         "-p": "--prompt", "-t": "--task", "-b": "--batch-size", "-v": "--vector"}
NO_OVERWRITE_YET: set[str] = set()
# the same thing has the same default
DEFAULTS = {"--context-length": CONTEXT_LENGTH, "--n-prompts": N_PROMPTS}


def all_commands():
    """(path, click command) for every leaf command of `interplab`."""
    root = typer.main.get_command(app)
    found = []

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, path + [name])
        else:
            found.append((" ".join(path), command))

    walk(root, [])
    return found


COMMANDS = all_commands()


def options(command):
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option" and p.name != "help"]


def test_every_command_is_walked():
    names = {path for path, _ in COMMANDS}
    assert {"demo", "generate", "info", "steer", "vector eval", "patch", "lens", "sae train", "sae steer",
            "toy grokking", "toy superposition"} <= names


@pytest.mark.parametrize("path, command", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_options_follow_the_conventions(path, command):
    for option in options(command):
        names = set(option.opts) | set(option.secondary_opts)
        assert option.help and option.help.strip(), f"{path} {option.opts}: no help text"
        assert not names & RETIRED, f"{path}: retired option name {names & RETIRED}"
        for short, long in SHORT.items():
            if short in names:
                assert long in names, f"{path}: {short} means {sorted(names)}, not {long}"
            if long in option.opts and long in ("--model", "--out", "--max-new-tokens"):
                assert short in names, f"{path}: {long} without {short}"
        if option.default is not None and not option.is_flag:
            assert option.show_default is not False, f"{path} {option.opts}: default not shown"
        for name, default in DEFAULTS.items():
            if name in names:
                assert option.default == default, f"{path} {name} default {option.default} != {default}"
        if "--model" in names:
            assert option.default in (DEFAULT_MODEL, None), f"{path}: --model default {option.default}"
            assert option.default == DEFAULT_MODEL or "made on" in option.help
        if "--max-new-tokens" in names and path != "demo":
            assert option.default == MAX_NEW_TOKENS, f"{path}: --max-new-tokens default {option.default}"
        if "--scale" in names:
            assert isinstance(option.default, float), f"{path}: --scale default {option.default!r} is not a number"
        if "--positions" in names and path in ("steer", "vector eval"):
            assert option.default == POSITIONS
    long_names = {n for o in options(command) for n in o.opts}
    if "--out" in long_names and path not in NO_OVERWRITE_YET:
        assert "--overwrite" in long_names, f"{path} writes --out but has no --overwrite"


@pytest.mark.parametrize("path, command", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_help_shows_defaults_and_does_not_fail(path, command):
    result = runner.invoke(app, path.split() + ["--help"])
    assert result.exit_code == 0, result.output
    if any(o.default not in (None, False) and not o.is_flag for o in options(command)):
        assert "[default:" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("interplab ")


# --- one error path ------------------------------------------------------------------------------

BAD_INPUT = [
    (["models", "--bogus"], "No such option"),
    (["info", "-m", "/no/such/model"], "no model folder"),
    (["generate", "", "-m", "MODEL"], "the prompt is empty"),
    (["generate", "hi", "-m", "MODEL", "-n", "0"], "--max-new-tokens must be >= 1"),
    (["demo", "-m", "MODEL", "--layers", "40"], "layer 40 is out of range"),
    (["demo", "-m", "MODEL", "--scales", "1,x"], "scale 'x' is not a number"),
    (["steer", "--vector", "MISSING", "hi"], "no steering vector folder"),
    (["steer", "--vector", "MISSING", "--scale", "x", "hi"], "Invalid value for '--scale'"),
    (["vector", "extract", "-o", "OUT", "-m", "MODEL"], "give exactly one source"),
    (["vector", "eval", "MISSING"], "no steering vector folder"),
    (["vector", "export-gguf", "MISSING", "-o", "OUT/v.gguf"], "no steering vector folder"),
    (["vector", "import-gguf", "MISSING.gguf", "-o", "OUT"], "missing.gguf"),
    (["vector", "info", "MISSING"], "no steering vector folder"),
    (["ablate", "-m", "MODEL", "--method", "half"], "--method must be one of"),
    (["patch", "-m", "MODEL", "--grid", "foo"], "--grid must be one of"),
    (["patch", "-m", "MODEL", "--layers", "0-9"], "layer 3 is out of range"),
    (["attribute", "-m", "MODEL", "--direction", "up"], "--direction must be one of"),
    (["lens", "-m", "MODEL", "--task", "ioi", "--prompt", "x"], "not both"),
    (["lens", "-m", "MODEL", "--task", "nothing.jsonl"], "--task must be 'ioi' or a JSONL facts file"),
    (["embed-math", "w1 - w2", "-m", "MODEL", "--space", "middle"], "--space must be one of"),
    (["sae", "train", "--site", "x", "--corpus", "c.txt", "-o", "OUT", "-m", "MODEL"], "unknown site 'x'"),
    (["sae", "train", "--site", "blocks.9.hook_resid_post", "--corpus", "c.txt", "-o", "OUT", "-m", "MODEL"],
     "layer 9 is out of range"),
    (["sae", "eval", "MISSING", "--corpus", "c.txt"], "missing"),
    (["sae", "features", "MISSING", "--corpus", "c.txt", "-o", "OUT/f.db"], "missing"),
    (["sae", "inspect", "MISSING", "some text"], "missing"),
    (["sae", "search", "MISSING.db", "dog"], "missing.db"),
    (["sae", "card", "MISSING.db", "3", "-o", "OUT/c.html"], "missing.db"),
    (["sae", "steer", "MISSING", "--feature", "1", "--prompt", "hi", "--method", "paint"], "--method must be one of"),
    (["sae", "compare-steering", "MISSING", "--feature", "1", "--neutral", "c.txt"], "give prompts"),
    (["sae", "bench", "MISSING", "-o", "OUT", "--caa", "nonsense"], "no CAA test data for 'nonsense'"),
    (["sae", "explain", "MISSING", "--index", "MISSING.db", "--features", "0", "--base-url", "http://127.0.0.1:9/v1",
      "--explainer", "x", "-o", "OUT"], "missing"),
    (["sae", "explain", "MISSING", "--index", "MISSING.db", "--features", "0,x", "--base-url", "http://127.0.0.1:9/v1",
      "--explainer", "x", "-o", "OUT"], "--features takes comma-separated latent ids"),
    (["toy", "superposition", "-o", "OUT", "--sparsity", "1.0"], "outside [0, 1)"),
    (["toy", "grokking", "-o", "OUT", "--p", "100"], "prime > 2"),
    (["toy", "grokking", "--paper", "--bogus"], "No such option"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[:2]) for a, _ in BAD_INPUT])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, model_dir, args, message):
    swap = {"MODEL": model_dir, "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing"),
            "MISSING.gguf": str(tmp_path / "missing.gguf"), "MISSING.db": str(tmp_path / "missing.db"),
            "OUT/v.gguf": str(tmp_path / "out" / "v.gguf"), "OUT/f.db": str(tmp_path / "f.db"),
            "OUT/c.html": str(tmp_path / "c.html")}
    result = runner.invoke(app, [swap.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_writing_onto_a_file_as_a_folder_is_one_line(tmp_path, model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["embed-math", "w1 - w2", "-m", model_dir, "-o", str(blocker / "sub")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and str(blocker) in result.stderr


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, model_dir):
    out = tmp_path / "em"
    args = ["embed-math", "w1 - w2", "-m", model_dir, "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


def _app_raising(error: BaseException) -> typer.Typer:
    probe = typer.Typer(cls=InterplabGroup, pretty_exceptions_enable=False)

    @probe.command()
    def boom() -> None:
        raise error

    @probe.command()
    def other() -> None:
        """A second command, so that the group dispatches by name."""

    return probe


@pytest.mark.parametrize("error", [TypeError("bad type deep inside"), KeyError("k"), AttributeError("a"),
                                   RuntimeError("r"), ModuleNotFoundError("no interplab.x", name="interplab.x"),
                                   ImportError("cannot import name 'x'")])
def test_bugs_keep_their_traceback(error):
    result = runner.invoke(_app_raising(error), ["boom"])
    assert result.exit_code == 1 and result.exception is error  # not swallowed into "error: ..."


@pytest.mark.parametrize("error, line", [
    (ValueError("layer 40 is out of range"), "error: layer 40 is out of range"),
    (FileNotFoundError(2, "No such file or directory", "x.txt"), "error: No such file or directory: x.txt"),
    (IsADirectoryError(21, "Is a directory", "runs"), "error: Is a directory: runs"),
    (PermissionError(13, "Permission denied", "/etc/x"), "error: Permission denied: /etc/x"),
    (ModuleNotFoundError("No module named 'gguf'", name="gguf"), "error: No module named 'gguf'"),
    (ImportError("reading GGUF needs the gguf package: pip install gguf"), "error: reading GGUF needs"),
])
def test_user_errors_are_one_line_exit_2(error, line):
    result = runner.invoke(_app_raising(error), ["boom"])
    assert result.exit_code == 2 and result.stderr.startswith(line) and result.stderr.count("\n") == 1


def test_message_rules():
    assert user_error_message(TypeError("x")) is None
    assert user_error_message(ValueError("a\nb")) == "a\nb"  # joined into one line when printed


def test_sae_steer_refuses_a_feature_the_sae_lacks(tmp_path):
    """`sae steer` / `compare-steering` check the latent index against the SAE before loading a model."""
    from interplab.sae import SAE, SAEConfig
    from interplab.sae.formats import save_sae

    folder = tmp_path / "sae"
    save_sae(SAE(SAEConfig(d_in=8, d_sae=16, family="topk", k=2, site="blocks.0.hook_resid_post",
                           model_id="nowhere/no-model")), folder)
    for command in (["steer", str(folder), "--feature", "16", "--prompt", "hi"],
                    ["compare-steering", str(folder), "--feature", "99", "--neutral", str(tmp_path),
                     "--prompt", "hi"]):
        result = runner.invoke(app, ["sae", *command])
        assert result.exit_code == 2, result.output
        assert "out of range: this SAE has 16 latents (valid 0..15)" in result.output
        assert "Traceback" not in result.output
