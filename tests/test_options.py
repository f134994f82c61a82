"""The decoding and loading options are declared once (specee_pc.options): every command's flags
come from the dataclasses, and every bad value is one line."""
import dataclasses
import importlib
import math
import subprocess
import sys

import pytest

import specee_pc
from specee_pc.cli import SUBCOMMANDS
from specee_pc.options import DecodeOptions, ModelOptions


def declared_flags():
    """flag -> (class name, field name) for every flag the dataclasses declare."""
    flags = {}
    for cls in (DecodeOptions, ModelOptions):
        for f in dataclasses.fields(cls):
            for key in ("flag", "short", "sweep"):
                if f.metadata[key]:
                    flags.setdefault(f.metadata[key], []).append((cls.__name__, f.name))
    return flags


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_option_flag_comes_from_the_dataclasses(command):
    parser = importlib.import_module(SUBCOMMANDS[command][0]).build_parser()
    declared = declared_flags()
    for action in parser._actions:
        ours = [flag for flag in action.option_strings if flag in declared]
        if not ours:
            continue
        made = getattr(action, "specee_option", None)
        assert made is not None, f"{command}: {action.option_strings} declared by hand, not by options.add_arguments"
        cls, name, sweep = made
        assert (cls, name) in declared[ours[0]] and action.dest == name
        meta = {f.name: f for f in dataclasses.fields(getattr(specee_pc.options, cls))}[name].metadata
        assert action.option_strings == ([meta["sweep"]] if sweep else [x for x in (meta["short"], meta["flag"]) if x])
        if not sweep and meta["choices"]:
            assert tuple(action.choices) == tuple(meta["choices"])


@pytest.mark.parametrize("changes, flag", [
    ({"exit_threshold": -3.0}, "--threshold"), ({"exit_threshold": math.nan}, "--threshold"),
    ({"exit_threshold": 0.0}, "--threshold"), ({"exit_threshold_unmatched": 1.5}, "--threshold-unmatched"),
    ({"draft_max": 0}, "--draft-max"), ({"draft_max": 4, "draft_length": 5}, "--draft-length"),
    ({"speculate": "psychic"}, "--speculate"), ({"drafter": "eagle"}, "--drafter"),
    ({"exit_rule": "sometimes"}, "--exit-rule"), ({"kv_policy": "stale"}, "--kv-policy"),
    ({"force_exit_layers": [-1]}, "--force-exit-layers"), ({"draft": "model.bin"}, "--draft")])
def test_bad_decode_options_name_their_flag_in_one_line(changes, flag):
    with pytest.raises(ValueError) as e:
        DecodeOptions(**changes)
    assert str(e.value).startswith(flag + " ") and "\n" not in str(e.value)


def test_bad_model_options_and_modes():
    for changes in ({"n_ctx": -5}, {"n_ctx": 8}, {"n_threads": 0}, {"n_gpu_layers": -2}):
        with pytest.raises(ValueError):
            ModelOptions(**changes)
    assert DecodeOptions().mode == "plain"
    assert DecodeOptions(speculate="lookup").mode == "speculate"
    assert DecodeOptions(predictor="auto").mode == "exit" and DecodeOptions(force_exit_layers=[3]).mode == "exit"
    assert DecodeOptions(speculate="none", predictor="auto").mode == "exit"


def test_llama_checks_its_options_before_loading(tmp_path):
    # a missing file would be the other error: the options come first
    with pytest.raises(ValueError, match="--threshold"):
        specee_pc.Llama(str(tmp_path / "missing.gguf"), exit_threshold=2.0)
    with pytest.raises(ValueError, match="-c"):
        specee_pc.Llama(str(tmp_path / "missing.gguf"), n_ctx=-5)
    with pytest.raises(TypeError):
        DecodeOptions(no_such_option=1)


@pytest.mark.parametrize("command, args", [
    ("run", ["-c", "-5", "-p", "hi"]), ("run", ["--threshold", "-3", "-p", "hi"]),
    ("run", ["--kv-policy", "stale"]), ("run", ["-t", "zero"]), ("bench", ["-c", "-5"]),
    ("bench", ["--thresholds", "0.5,7"]), ("eval", ["--threshold", "nan"]), ("serve", ["-c", "-5"]),
    ("calibrate", ["model.gguf", "--threshold", "-3"]), ("convert", ["x.pt", "--threshold", "2"])])
def test_bad_option_values_exit_1_with_one_line(command, args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "specee_pc.cli", command, *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("specee-pc")
