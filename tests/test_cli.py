"""Every CLI path a user can hit: exit codes 0 / 2 / 1, and one-line messages, never tracebacks."""

import io
import subprocess
import sys

import pytest
from edgepack.runtime import cli

COMMANDS = ["build", "run", "chat", "inspect", "eval"]


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "usage: edgepack" in capsys.readouterr().out


def test_console_script_is_installed():
    proc = subprocess.run(["edgepack", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "build" in proc.stdout


@pytest.mark.parametrize("argv", [[], ["bogus"], ["run"], ["build", "default"], ["run", "x", "y", "--max-tokens", "z"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_run_prints_answer(tiny_package, capsys):
    code, out, err = run_cli(["run", str(tiny_package), "hello", "--max-tokens", "6", "--stats"], capsys)
    assert code == 0
    assert out.endswith("\n")
    assert "new tokens" in err and "tokens/s" in err


def test_run_sampling_options(tiny_package, capsys):
    argv = ["run", str(tiny_package), "hello", "--max-tokens", "6", "--temperature", "0.9", "--top-k", "10",
            "--top-p", "0.9", "--seed", "3", "--raw", "--threads", "1"]
    first = run_cli(argv, capsys)
    second = run_cli(argv, capsys)
    assert first[0] == 0 and first[1] == second[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "2"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-tokens", "0"], "max-tokens"),
        (["--threads", "-3"], "threads"),
    ],
)
def test_run_bad_values_exit_2(tiny_package, capsys, extra, message):
    code, _, err = run_cli(["run", str(tiny_package), "hi", *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_run_missing_package_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "none"), "hi"], capsys)
    assert code == 2 and "package not found" in err


def test_run_tampered_package_exits_2(package_copy, capsys):
    (package_copy / "tokenizer.json").write_text("{}")
    code, _, err = run_cli(["run", str(package_copy), "hi"], capsys)
    assert code == 2 and "tokenizer.json" in err


def test_inspect(tiny_package, capsys):
    code, out, _ = run_cli(["inspect", str(tiny_package), "--verify"], capsys)
    assert code == 0
    assert "LlamaForCausalLM" in out and "parity" in out and "verified" in out
    code, out, _ = run_cli(["inspect", str(tiny_package), "--json"], capsys)
    assert code == 0 and '"format_version": 1' in out


def test_inspect_not_a_package(tmp_path, capsys):
    code, _, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "manifest.json" in err


def test_inspect_a_plain_file_says_what_it_takes(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    code, _, err = run_cli(["inspect", str(f)], capsys)
    assert code == 2 and "is not a package" in err and "delta" in err and len(err.strip().splitlines()) == 1


def test_eval_of_a_bad_model_fails_before_any_progress_bar(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"not a model")
    code, _, err = run_cli(["eval", str(f)], capsys)
    assert code == 2 and "not a .gguf" in err and "window" not in err


def test_chat_streams_turns_and_reset(tiny_package, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n/reset\nhow are you\n/exit\nnever read\n"))
    code, out, err = run_cli(["chat", str(tiny_package), "--max-tokens", "4", "--system", "Be brief."], capsys)
    assert code == 0
    assert out.count("\n") == 2  # two answers, each ended by a newline
    assert "conversation reset" in err


def test_build_bad_model_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["build", str(tmp_path / "missing"), "-o", str(tmp_path / "pkg")], capsys)
    assert code == 2 and "model not found" in err
    assert not (tmp_path / "pkg").exists()


def test_build_bad_context_exits_2(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(["build", str(tiny_model_dir), "-o", str(tmp_path / "p"), "--context", "3"], capsys)
    assert code == 2 and "--context" in err


def test_internal_error_exits_1_without_traceback(tiny_package, capsys, monkeypatch):
    from edgepack.runtime import commands

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(commands, "load", boom)
    code, _, err = run_cli(["run", str(tiny_package), "hi"], capsys)
    assert code == 1 and "internal error" in err and "kaboom" in err


def test_build_writes_package_and_replaces_atomically(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pkg"
    code, _, err = run_cli(["build", str(tiny_model_dir), "-o", str(out), "--context", "128"], capsys)
    assert code == 0 and "built" in err
    first = (out / "manifest.json").read_text()
    # A failing rebuild leaves the previous package complete and untouched.
    code, _, _ = run_cli(["build", str(tmp_path / "missing"), "-o", str(out)], capsys)
    assert code == 2 and (out / "manifest.json").read_text() == first
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_eval_package_matches_pytorch_model(tiny_package, tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The while statement is used for repeated execution as long as an expression is true. " * 20)
    code, ours, _ = run_cli(["eval", str(tiny_package), "--text", str(text), "--context", "64"], capsys)
    assert code == 0
    code, torchs, _ = run_cli(["eval", str(tiny_model_dir), "--text", str(text), "--context", "64"], capsys)
    assert code == 0
    a, b = float(ours.split()[1]), float(torchs.split()[1])
    assert abs(a - b) / b < 1e-3
    assert ours.split()[3] == torchs.split()[3]  # same number of tokens scored


def test_eval_default_text_and_errors(tiny_package, tmp_path, capsys):
    code, out, _ = run_cli(["eval", str(tiny_package), "--max-windows", "2", "--context", "32"], capsys)
    assert code == 0 and "2 windows of 32" in out
    code, _, err = run_cli(["eval", str(tiny_package), "--text", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and "text not found" in err
    code, _, err = run_cli(["eval", str(tiny_package), "--context", "1"], capsys)
    assert code == 2 and "--context" in err
    # The tiny package holds 256 positions: the default 512-token window shrinks to it, a longer one is refused.
    code, out, _ = run_cli(["eval", str(tiny_package), "--max-windows", "1"], capsys)
    assert code == 0 and "1 window of 256" in out
    code, _, err = run_cli(["eval", str(tiny_package), "--context", "300"], capsys)
    assert code == 2 and "pass --context 256 or less" in err


def test_eval_missing_target_says_not_found(tmp_path, capsys):
    for extra in ([], ["--delta", str(tmp_path / "d.safetensors")]):
        code, _, err = run_cli(["eval", str(tmp_path / "none"), *extra], capsys)
        assert code == 2 and "not found" in err and "merge" not in err
