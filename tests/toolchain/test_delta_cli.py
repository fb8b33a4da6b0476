"""``edgepack delta`` and the --delta options, end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
from edgepack.runtime import cli, delta_file
from edgepack.toolchain.delta import budget


def _cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def delta_cli_file(tiny_model_dir, tiny_finetune_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-delta") / "ft.safetensors"
    assert cli.main(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--method", "magtruncsvd", "--rank", "1",
                     "-o", str(path)]) == 0
    return path


def test_delta_inspect_and_run(delta_cli_file, tiny_slots_package, capsys):
    code, out, _ = _cli(["inspect", str(delta_cli_file), "--verify"], capsys)
    assert code == 0 and "magtruncsvd, rank r=1, relax c=1" in out and "verified" in out
    assert "format v2" in out and "values int8" in out  # the packed layout and int8 values by default
    code, out, _ = _cli(["inspect", str(delta_cli_file), "--json"], capsys)
    assert json.loads(out)["info"]["method"] == "magtruncsvd"
    code, out, _ = _cli(["run", str(tiny_slots_package), "hello", "--max-tokens", "4", "--delta", str(delta_cli_file)],
                        capsys)
    assert code == 0 and out.strip()
    code, out, _ = _cli(["eval", str(tiny_slots_package), "--max-windows", "1", "--context", "32", "--delta",
                         str(delta_cli_file)], capsys)
    assert code == 0 and out.startswith("perplexity")


def test_delta_errors_are_one_line(delta_cli_file, tiny_package, tiny_model_dir, tmp_path, capsys):
    code, _, err = _cli(["run", str(tiny_package), "hi", "--delta", str(delta_cli_file)], capsys)
    assert code == 2 and "--delta-slots" in err
    code, _, err = _cli(["delta", str(tiny_model_dir), str(tiny_model_dir), "-o", str(tmp_path / "x.safetensors"),
                         "--method", "truncsvd"], capsys)
    assert code == 2 and "identical" in err
    code, _, err = _cli(["delta", str(tiny_model_dir), str(tmp_path / "nope"), "-o", str(tmp_path / "x.safetensors")],
                        capsys)
    assert code == 2 and "nope" in err
    code, _, err = _cli(["delta", "a", "b", "-o", str(tmp_path / "x.bin")], capsys)
    assert code == 2 and ".safetensors" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    code, _, err = _cli(["inspect", str(bad)], capsys)
    assert code == 2 and "bad.safetensors" in err


def test_delta_tune_flags(tiny_model_dir, tiny_finetune_dir, tmp_path, capsys):
    from pydoc_data.topics import topics

    valid = tmp_path / "valid.txt"
    valid.write_text(" ".join(list(topics.values())[20:30]))
    out_file = tmp_path / "tuned.safetensors"
    code, _, _ = _cli(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--method", "magtruncsvd", "--rank", "1",
                       "--valid", str(valid), "--windows", "2", "--tune-steps", "2", "--tune-lr", "0.01",
                       "-o", str(out_file)], capsys)
    assert code == 0
    code, out, _ = _cli(["inspect", str(out_file), "--json"], capsys)
    tune = json.loads(out)["info"]["tune"]
    assert tune["steps"] == 2 and tune["lr"] == 0.01
    code, _, _ = _cli(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--method", "osd", "--rank", "1",
                       "--valid", str(valid), "--windows", "2", "--tune-steps", "2", "--tune-hard", "0.5",
                       "-o", str(out_file)], capsys)
    assert code == 0
    code, out, _ = _cli(["inspect", str(out_file), "--json"], capsys)
    meta = json.loads(out)
    assert meta["info"]["tune"]["hard_nll_weight"] == 0.5 and meta["info"]["method"] == "osd"
    stored = delta_file.read(out_file)  # the bits the metadata records are those of the entries stored
    recounted = {n: budget.sparse_bits(x.n_out, x.n_in, x.rank, x.u.kept, x.v.kept) for n, x in stored.layers.items()}
    assert recounted == {n: layer["bits"] for n, layer in meta["layers"].items()}
    assert 0 < sum(recounted.values()) <= meta["info"]["budget_bits"]  # the tune moves values, never the pattern
    assert meta["accounted_bits"] == stored.bits
    code, _, err = _cli(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--valid", str(valid), "--tune-steps",
                         "2", "--tune-hard", "2", "-o", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--tune-hard" in err
    code, _, _ = _cli(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--method", "osd", "--rank", "1",
                       "--valid", str(valid), "--windows", "2", "--tune-steps", "2", "--prune-during-tune",
                       "-o", str(out_file)], capsys)
    assert code == 0
    code, out, _ = _cli(["inspect", str(out_file), "--json"], capsys)
    info = json.loads(out)["info"]
    assert info["tune"]["pruned_during_tune"] and info["tune"]["steps"] == 2
    code, _, err = _cli(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--tune-steps", "2",
                         "-o", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--valid" in err.strip().splitlines()[-1] and "loading" not in err  # refused up front
    code, _, err = _cli(["delta", str(tiny_model_dir), str(tiny_finetune_dir), "--tune-steps", "-1",
                         "-o", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--tune-steps" in err
