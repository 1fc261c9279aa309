"""The daemon's config file: it sets what the flags set, flags win, and a bad
key or value is an error naming the file and the key."""
import pytest

from livemig.cli import EXIT_USAGE, build_parser, main
from livemig.errors import ConfigError
from livemig.service.config_file import apply_config_file

CONFIG = """\
listen = "127.0.0.1:7999"
log-level = "debug"
log-json = true
postcopy-recovery-timeout = 12.5
"""


def _daemon_args(*argv):
    argv = ["daemon", *argv]
    args = build_parser().parse_args(argv)
    apply_config_file(args, args.daemon_parser, argv[1:])
    return args


def test_the_file_sets_listen_address_and_log_level(tmp_path):
    path = tmp_path / "livemig.toml"
    path.write_text(CONFIG)
    args = _daemon_args("--config", str(path))
    assert args.listen == "127.0.0.1:7999"
    assert args.log_level == "debug"
    assert args.log_json is True
    assert args.postcopy_recovery_timeout == 12.5


def test_a_flag_on_the_command_line_wins(tmp_path):
    path = tmp_path / "livemig.toml"
    path.write_text(CONFIG)
    args = _daemon_args("--config", str(path), "--listen", "127.0.0.1:7001",
                        "--log-level", "warning")
    assert args.listen == "127.0.0.1:7001"
    assert args.log_level == "warning"
    assert args.log_json is True                      # not on the command line: from the file


@pytest.mark.parametrize("text, key", [
    ('listne = "127.0.0.1:7400"\n', "listne"),
    ('log-level = "loud"\n', "log-level"),
    ('postcopy-recovery-timeout = -1\n', "postcopy-recovery-timeout"),
    ('log-json = "yes"\n', "log-json"),
    ('detach = true\n', "detach"),
])
def test_a_bad_key_or_value_names_the_file_and_the_key(tmp_path, text, key):
    path = tmp_path / "livemig.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        _daemon_args("--config", str(path))
    assert str(path) in str(err.value) and repr(key) in str(err.value)


def test_the_command_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "livemig.toml"
    path.write_text("listne = 1\n")
    assert main(["daemon", "--config", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(path) in err and "'listne'" in err and "Traceback" not in err


def test_a_missing_file_names_the_flag(tmp_path, capsys):
    assert main(["daemon", "--config", str(tmp_path / "none.toml")]) == EXIT_USAGE
    assert "--config" in capsys.readouterr().err


def test_the_example_in_docs_is_a_valid_file():
    import pathlib

    example = pathlib.Path(__file__).parents[2] / "docs" / "livemig.toml.example"
    args = _daemon_args("--config", str(example))
    assert args.listen == "0.0.0.0:7400" and args.metrics == "127.0.0.1:9740"
