"""Config: flags, files, validation. No MPI."""

from pathlib import Path

import pytest

from mpips.config import ConfigError, parse_args


def test_defaults_match_the_documented_job():
    cfg = parse_args([])
    assert (cfg.roles.servers, cfg.roles.data_servers) == (1, 1)
    assert cfg.train.sync == "bsp" and cfg.model.model == "mlp" and cfg.data.dataset == "digits"


def test_flags_map_onto_concerns():
    cfg = parse_args(["--servers", "2", "--lr", "0.5", "--sync", "ssp", "--staleness", "3", "--dry-run"])
    assert cfg.roles.servers == 2 and cfg.optim.lr == 0.5
    assert cfg.train.sync == "ssp" and cfg.train.staleness == 3 and cfg.train.dry_run


@pytest.mark.parametrize(
    "text, suffix",
    [
        ("lr = 0.25\nservers = 2\n[train]\nsync = 'asp'\n", ".toml"),
        ("lr: 0.25\nservers: 2\ntrain:\n  sync: asp\n", ".yaml"),
    ],
)
def test_config_file_gives_the_same_keys_and_cli_wins(tmp_path, text, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = parse_args(["--config", str(path)])
    assert cfg.optim.lr == 0.25 and cfg.roles.servers == 2 and cfg.train.sync == "asp"
    cfg = parse_args(["--config", str(path), "--lr", "0.1"])
    assert cfg.optim.lr == 0.1 and cfg.roles.servers == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate = 0.1\n", "unknown config key 'learning_rate'"),
        ("lr = 'fast'\n", "config key 'lr' must be float"),
        ("sync = 'sometimes'\n", "must be one of bsp, asp, ssp"),
        ("lr = -1.0\n", "--lr must be positive"),
        ("lr = \n", "is not valid TOML"),
    ],
)
def test_bad_config_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_args(["--config", str(tmp_path / "nope.toml")])


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("lr: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(path)])


def test_replicas_cannot_exceed_data_servers():
    with pytest.raises(ConfigError, match="--replicas"):
        parse_args(["--data-servers", "1", "--replicas", "2"])


def test_the_docs_flag_reference_documents_every_flag():
    """The flag reference of docs/command-line.md is generated from these dataclasses
    (docs/gen_flags.py); tests/test_docs.py checks it against --help as well."""
    import re
    import sys
    from pathlib import Path

    from mpips.config import build_parser

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
    import gen_flags

    documented = set(re.findall(r"^\| `(--[a-z-]+)`", gen_flags.render(), re.M))
    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")}
    flags -= {"--help", "--config"} | {f for f in flags if f.startswith("--no-")}
    assert flags <= documented, f"flags missing from the flag reference: {sorted(flags - documented)}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sync", "foo"], r"^argument --sync: invalid choice: 'foo' \(choose from 'bsp', 'asp', 'ssp'\)"
                            r" \(see python -m mpips.train --help\)$"),
        (["--lr", "fast"], r"^argument --lr: invalid float value: 'fast' \(see python -m mpips.train --help\)$"),
        (["--learning-rate", "1"], r"^unrecognized arguments: --learning-rate 1 \(see"),
        (["--lr", "-1"], r"^--lr must be positive \(got -1.0\)$"),
        (["--batch-size", "0"], r"^--batch-size must be at least 1 \(got 0\)$"),
    ],
)
def test_a_bad_flag_is_one_config_error_not_a_usage_dump(argv, message, capsys):
    """argparse would print its whole usage and exit; the job says one line instead (mpips.errors)."""
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)
    assert capsys.readouterr() == ("", "")


def test_help_states_the_factory_contract():
    from mpips.config import build_parser

    text = " ".join(build_parser().format_help().split())
    for words in ("package.module:factory", "calls factory with those of these keywords its signature names",
                  "input_shape (tuple of ints, one sample's shape)", "num_classes (int, the output's last dimension",
                  "task (str)", "target_shape (tuple of ints", "nn.Module with float32, bfloat16 or float16",
                  "B x num_classes"):
        assert words in text, words
    assert parse_args(["--debug"]).train.debug and not parse_args([]).train.debug
    page = (Path(__file__).resolve().parent.parent / "docs" / "command-line.md").read_text()
    start = page.index("## Your own model")
    section = page[start:page.index("\n## ", start)]
    for words in ("`input_shape`: a tuple of ints", "`num_classes`: an int", "only if the factory's",
                  "`task`: a str", "`target_shape`: a tuple of ints", "parameters are all float32, all bfloat16 or",
                  "`(B, num_classes)`"):
        assert words in section, words


@pytest.mark.parametrize("value", ["63", str(2**30 + 1)])
def test_chunk_bytes_stay_between_a_push_header_and_1_gib(value):
    with pytest.raises(ConfigError, match=r"--chunk-bytes must be between 64 \(a push header\) and 1073741824"):
        parse_args(["--chunk-bytes", value])
    assert parse_args(["--chunk-bytes", "64"]).train.chunk_bytes == 64
