"""swarm.options: a dataclass declares each option once; flags, help, defaults and instances come from it."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from swarm.options import add_arguments, declared, from_args, option


@dataclass(frozen=True)
class Example:
    name: str  # not an option: the caller parses it (here: a positional argument)
    port: int = option(8080, "port to listen on")
    ratio: float = option(0.5, "share of 100% to keep")
    mode: str = option("fast", "how to run", choices=["fast", "slow"])
    verbose: bool = option(False, "say more")
    key_path: str | None = option(None, "where the key is")
    peers: tuple[str, ...] = option(("a", "b"), "peers to dial", metavar="MADDR")
    span: tuple[int, int] | None = option(None, "START END")
    weights: Sequence[float] = option((), "one per block")
    tags: list[str] = option([], "labels")


def _parser(**kwargs) -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("name")
    return parser, add_arguments(parser, Example, **kwargs)


def test_defaults_come_from_the_declaration():
    parser, names = _parser()
    assert names == [f.name for f in declared(Example)] == ["port", "ratio", "mode", "verbose", "key_path", "peers", "span",
                                                            "weights", "tags"]
    config = from_args(Example, parser.parse_args(["x"]))
    assert config == Example("x")
    assert Example.port == 8080 and config.peers == ("a", "b")  # a default is also the class attribute
    assert Example("x").tags is not Example("y").tags  # a mutable default is copied per instance


def test_flags_parse_by_the_annotation():
    parser, _ = _parser()
    args = parser.parse_args(["x", "--port", "9", "--ratio", "0.25", "--mode", "slow", "--verbose", "--key-path", "k",
                              "--peers", "p", "q", "--span", "2", "5", "--weights", "1", "2.5", "--tags", "t"])
    config = from_args(Example, args)
    assert config == Example("x", 9, 0.25, "slow", True, "k", ("p", "q"), (2, 5), (1.0, 2.5), ["t"])
    assert isinstance(config.peers, tuple) and isinstance(config.span, tuple) and isinstance(config.tags, list)
    hash(dataclasses.replace(config, tags=None))  # tuples, not lists: a frozen instance stays hashable
    assert from_args(Example, parser.parse_args(["x", "--verbose", "--no-verbose"])).verbose is False


@pytest.mark.parametrize("argv, message", [
    (["x", "--port", "nine"], "invalid int value"),
    (["x", "--mode", "medium"], "invalid choice"),
    (["x", "--span", "1"], "expected 2 arguments"),
])
def test_bad_values_are_refused_by_argparse(argv, message, capsys):
    parser, _ = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_shows_the_declared_help_and_default():
    parser, _ = _parser()
    text = " ".join(parser.format_help().split())
    assert "--port PORT port to listen on (default: 8080)" in text
    assert "share of 100% to keep (default: 0.5)" in text  # help is plain text: a % is no format
    assert "--peers MADDR [MADDR ...] peers to dial (default: ('a', 'b'))" in text
    assert "--verbose, --no-verbose say more (default: False)" in text
    parser.set_defaults(port=1)  # the caller can still change a default for one command
    assert "port to listen on (default: 1)" in " ".join(parser.format_help().split())


def test_only_exclude_extra_and_undeclared_fields():
    parser, names = _parser(only={"port", "mode", "verbose"}, exclude={"verbose"})
    assert names == ["port", "mode"]
    args = parser.parse_args(["x", "--port", "1"])
    assert from_args(Example, args, mode="slow", peers=["z"]) == Example("x", 1, mode="slow", peers=("z",))
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--ratio", "1"])


def test_a_type_without_a_flag_needs_a_parser():
    @dataclass
    class Odd:
        when: complex = option(1j, "a complex number")

    with pytest.raises(TypeError, match="option 'when': no flag for type"):
        add_arguments(argparse.ArgumentParser(), Odd)

    @dataclass
    class Parsed:
        when: complex = option(1j, "a complex number", type=complex)

    parser = argparse.ArgumentParser()
    add_arguments(parser, Parsed)
    assert from_args(Parsed, parser.parse_args(["--when", "2+1j"])).when == 2 + 1j
