"""Every numeric flag of every tool has one documented range, checked before any work: absurd values
are argparse's one usage line (exit 2), and the Python API refuses them in the same words."""

from __future__ import annotations

import argparse

import pytest

from fkd_shards.common.ranges import RANGES, Ranged, check_range
from fkd_shards.convert.cli import build_parser as convert_parser
from fkd_shards.relabel.cli import build_parser as relabel_parser
from fkd_shards.train.config import build_parser as train_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """fkd-train's and fkd-convert's sub-commands, as their main() builds them."""
    import fkd_shards.convert.cli as convert_cli
    import fkd_shards.train.cli as train_cli

    found = {}
    for module, names in ((train_cli, ("inspect", "report", "export")), (convert_cli, ("verify", "inspect"))):
        for name in names:
            built = []
            real = argparse.ArgumentParser.parse_args

            def capture(self, *args, built=built, **kwargs):
                built.append(self)
                raise SystemExit(0)

            argparse.ArgumentParser.parse_args = capture
            try:
                module.main([name, "--help"])
            except SystemExit:
                pass
            finally:
                argparse.ArgumentParser.parse_args = real
            found[f"{module.PROG} {name}"] = built[0]
    return found


PARSERS = {"fkd-train": train_parser(), "fkd-convert": convert_parser(), "fkd-relabel": relabel_parser()}


def _numeric(parser: argparse.ArgumentParser):
    """Every action whose value is a number (by its default or its type)."""
    for action in parser._actions:  # argparse keeps its actions here; read, not changed
        if isinstance(action.type, Ranged) or action.type in (int, float) or (
                isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
                and action.nargs != 0 and action.option_strings and action.type is None
                and action.choices is None and action.const is None):
            yield action


@pytest.mark.parametrize("tool", ["fkd-train", "fkd-convert", "fkd-relabel", "sub-commands"])
def test_every_numeric_flag_takes_its_range_from_the_one_table_and_shows_it(tool):
    parsers = _subparsers() if tool == "sub-commands" else {tool: PARSERS[tool]}
    seen = 0
    for name, parser in parsers.items():
        for action in _numeric(parser):
            assert isinstance(action.type, Ranged), (name, action.option_strings)
            assert f"(range {action.type.range.words()})" in action.help, (name, action.option_strings)
            seen += 1
    assert seen >= {"fkd-train": 15, "fkd-convert": 7, "fkd-relabel": 12, "sub-commands": 2}[tool]


@pytest.mark.parametrize("tool,argv,said", [
    ("fkd-train", ["--shards", "s", "--batch-size", "1000000000000"], "argument --batch-size: must be in [1, 65536]"),
    ("fkd-train", ["--shards", "s", "--seed", "4294967296"], "argument --seed: must be in [0, 4294967295]"),
    ("fkd-train", ["--shards", "s", "-lr", "inf"], "argument -lr/--learning-rate: must be in [0, 1000], got inf"),
    ("fkd-train", ["--shards", "s", "-T", "0"], "argument -T/--temperature: must be in (0, 10000], got 0"),
    ("fkd-train", ["--shards", "s", "--adamw-lr", "nan"], "argument --adamw-lr: must be in [0, 1000], got nan"),
    ("fkd-train", ["--shards", "s", "--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    ("fkd-train", ["--shards", "s", "--momentum", "nan"], "argument --momentum: must be in [0, 1], got nan"),
    ("fkd-train", ["--shards", "s", "--epochs", "1e3"], "argument --epochs: not an integer: '1e3'"),
    ("fkd-relabel", ["--train-dir", "d", "--output", "o", "--batch-size", "99999999"], "must be in [1, 65536]"),
    ("fkd-relabel", ["--train-dir", "d", "--output", "o", "--crop-scale", "0", "1"],
     "argument --crop-scale: must be in (0, 1], got 0"),
    ("fkd-relabel", ["--train-dir", "d", "--output", "o", "--teacher-chunks", "0"], "must be in [1, 65536], got 0"),
    ("fkd-relabel", ["--train-dir", "d", "--output", "o", "--epochs", "99999999999"], "must be in [1, 100000]"),
    ("fkd-convert", ["--train-dir", "d", "--fkd-path", "f", "--output", "o", "--codec-temperature", "nan"],
     "argument --codec-temperature: must be in (0, 10000], got nan"),
    ("fkd-convert", ["--train-dir", "d", "--fkd-path", "f", "--output", "o", "--min-alignment", "nan"],
     "argument --min-alignment: must be in [0, 1], got nan"),
    ("fkd-convert", ["--train-dir", "d", "--fkd-path", "f", "--output", "o", "--workers", "0"],
     "argument --workers: must be in [1, 256], got 0"),
    ("fkd-convert", ["--train-dir", "d", "--fkd-path", "f", "--output", "o", "--input-size", "4096"],
     "argument --input-size: must be in [1, 2048], got 4096"),
])
def test_an_absurd_number_is_one_usage_line_before_any_work(capsys, tool, argv, said):
    with pytest.raises(SystemExit) as exited:
        PARSERS[tool].parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{tool}: error: ") and said in err[-1], err


def test_the_python_api_refuses_in_the_same_words():
    from fkd_shards.convert import ConvertOptions, convert
    from fkd_shards.convert.errors import ConvertError

    with pytest.raises(ConvertError, match=r"^--epochs must be in \[1, 100000\], got 0$"):
        convert(ConvertOptions("a", "b", "c", epochs=0))
    with pytest.raises(ValueError, match=r"^--seed must be in \[0, 4294967295\], got 4294967296$"):
        check_range("--seed", 2**32, ValueError)
    check_range("--seed", None, ValueError)  # not given
    for key, r in RANGES.items():  # every row is a range someone can satisfy
        assert r.low < r.high, key
        assert r.holds(r.high) and r.holds(type(r.high)(r.low)) != r.open_low, key


def test_seeds_that_torch_would_alias_are_refused_and_distinct_seeds_draw_differently():
    import torch

    from fkd_shards.train.config import ConfigError, parse_students

    torch.manual_seed(0)
    a = torch.rand(4)
    torch.manual_seed(2**32)  # why the range ends below 2**32: the CPU generator keeps 32 bits
    assert torch.equal(a, torch.rand(4))
    with pytest.raises(ConfigError, match=r"^--seeds: --seed must be in \[0, 4294967295\], got 4294967296$"):
        parse_students(None, None, "0,4294967296")
    assert [s.seed for s in parse_students(None, None, "0,4294967295")] == [0, 2**32 - 1]
