"""The settings loader on its own: precedence of the sources and the errors it raises.

The CLI's own checks (`check_serve`) are passed in where a test needs them, as `serve` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from config_support import error_of, load, write

from proxy.app import config
from proxy.app.config import ListenAddress, ServeConfig

# ---------------------------------------------------------------------------- precedence

FILE = """
listen = "127.0.0.1:7001"
backend = ["127.0.0.1:1001", "127.0.0.1:1002"]
policy = "random"
drain_timeout = 11
health_check = true
max_retries = 4
access_log_sample = 0.5
admin = "off"
"""


def test_defaults_without_any_source() -> None:
    cfg = load()
    assert cfg == ServeConfig()
    assert cfg.listen == (ListenAddress("127.0.0.1", 50051),)
    assert cfg.admin == ("127.0.0.1", 9901)
    assert cfg.max_retries == 2
    assert cfg.drain_timeout == 30.0
    assert cfg.health_check is False
    assert cfg.log_format is None  # auto: decided by logs.configure from stderr


def test_file_beats_defaults(tmp_path: Path) -> None:
    cfg = load("--config", write(tmp_path, FILE))
    assert cfg.listen == (ListenAddress("127.0.0.1", 7001),)
    assert cfg.backend == ("127.0.0.1:1001", "127.0.0.1:1002")
    assert cfg.policy == "random"
    assert cfg.drain_timeout == 11.0
    assert cfg.health_check is True
    assert cfg.max_retries == 4
    assert cfg.access_log_sample == 0.5
    assert cfg.admin is None
    assert config.describe(cfg, "policy") == f"policy (config file {tmp_path / 'proxy.toml'})"


def test_env_beats_file_and_flags_beat_env(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    env = {
        "GRPC_ETCD_PROXY_CONFIG": path,  # the file can come from the environment too
        "GRPC_ETCD_PROXY_POLICY": "least_request",
        "GRPC_ETCD_PROXY_BACKEND": "127.0.0.1:2001, 127.0.0.1:2002",
        "GRPC_ETCD_PROXY_DRAIN_TIMEOUT": "12.5",
        "GRPC_ETCD_PROXY_HEALTH_CHECK": "no",
        "GRPC_ETCD_PROXY_MAX_RETRIES": "5",
        "GRPC_ETCD_PROXY_ADMIN": "127.0.0.1:9999",
    }
    cfg = load(env=env)
    # env over file, for a string, a list, a float, a bool, an int, a host:port
    assert cfg.policy == "least_request"
    assert cfg.backend == ("127.0.0.1:2001", "127.0.0.1:2002")
    assert cfg.drain_timeout == 12.5
    assert cfg.health_check is False
    assert cfg.max_retries == 5
    assert cfg.admin == ("127.0.0.1", 9999)
    # the file still gives what the environment does not
    assert cfg.listen == (ListenAddress("127.0.0.1", 7001),)
    assert cfg.access_log_sample == 0.5
    assert config.describe(cfg, "policy") == "GRPC_ETCD_PROXY_POLICY"

    cfg = load(
        "--policy",
        "round_robin",
        "--backend",
        "127.0.0.1:3001",
        "--drain-timeout",
        "13",
        "--health-check",
        "--max-retries",
        "0",
        "--admin",
        "off",
        env=env,
    )
    assert cfg.policy == "round_robin"
    assert cfg.backend == ("127.0.0.1:3001",)  # a list comes whole from one source
    assert cfg.drain_timeout == 13.0
    assert cfg.health_check is True
    assert cfg.max_retries == 0
    assert cfg.admin is None
    assert cfg.listen == (ListenAddress("127.0.0.1", 7001),)
    assert config.describe(cfg, "policy") == "--policy"


def test_flag_turns_off_a_bool_the_file_turned_on(tmp_path: Path) -> None:
    assert load("--config", write(tmp_path, FILE), "--no-health-check").health_check is False


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('policy = "least_request"\n')
    cfg = load("--config", str(other), env={"GRPC_ETCD_PROXY_CONFIG": write(tmp_path, FILE)})
    assert cfg.policy == "least_request"
    assert cfg.listen == (ListenAddress("127.0.0.1", 50051),)


@pytest.mark.parametrize(
    "routes",
    [
        '[route]\n"echo.Echo" = "a"\n"pkg.Other" = "b"\n',
        'route = ["echo.Echo=a", "pkg.Other = b"]\n',
    ],
    ids=["table", "array"],
)
def test_routes_as_a_table_or_an_array(tmp_path: Path, routes: str) -> None:
    cfg = load("--config", write(tmp_path, 'etcd = "127.0.0.1:2379"\n' + routes), serve=True)
    assert cfg.route == (("echo.Echo", "a"), ("pkg.Other", "b"))


def test_routes_and_etcd_from_the_environment() -> None:
    env = {
        "GRPC_ETCD_PROXY_ETCD": "127.0.0.1:2379,127.0.0.1:2380",
        "GRPC_ETCD_PROXY_ROUTE": "echo.Echo=a,pkg.Other=b",
    }
    cfg = load(env=env, serve=True)
    assert cfg.route == (("echo.Echo", "a"), ("pkg.Other", "b"))
    assert cfg.etcd == "127.0.0.1:2379,127.0.0.1:2380"


def test_etcd_endpoints_as_a_toml_array(tmp_path: Path) -> None:
    cfg = load("--config", write(tmp_path, 'etcd = ["127.0.0.1:2379", "127.0.0.1:2380"]\n'))
    assert cfg.etcd == "127.0.0.1:2379,127.0.0.1:2380"


def test_etcd_password_from_its_old_variable() -> None:
    env = {"GRPC_ETCD_PROXY_ETCD_PASSWORD": "s3cret"}
    cfg = load("--etcd", "127.0.0.1:2379", "--target", "t", "--etcd-user", "u", env=env, serve=True)
    assert cfg.etcd_password == "s3cret"


def test_every_setting_has_a_flag_a_variable_and_a_key() -> None:
    names = [s.name for s in config.SETTINGS]
    assert len(names) == len(set(names))
    parser = argparse.ArgumentParser()
    config.add_serve_flags(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    for setting in config.SETTINGS:
        # A table of tables ([targets.NAME]) has no spelling as one flag or one variable.
        assert (setting.flag in flags) is setting.in_flags, setting.name
        assert setting.in_flags or setting.kind == "targets", setting.name
        assert setting.in_file or setting.in_flags, setting.name
        assert setting.env == "GRPC_ETCD_PROXY_" + setting.name.upper()


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('policy = "foo"', "policy: expected one of round_robin, least_request, random, got 'foo'"),
        ("drain_timeout = -1", "drain_timeout: expected a number of seconds >= 0, got '-1'"),
        ('drain_timeout = "30"', "drain_timeout: expected a number, got '30'"),
        ("max_retries = 1.5", "max_retries: expected an integer >= 0, got '1.5'"),
        ("max_retries = true", "max_retries: expected a number, got true"),
        ('health_check = "yes"', "health_check: expected true or false, got 'yes'"),
        ('backend = "127.0.0.1:1"', "backend: expected an array of strings, got '127.0.0.1:1'"),
        ('backend = ["127.0.0.1:0"]', "backend: backend port must not be 0"),
        ("backend = [1]", "backend: expected a string, got 1"),
        ('route = "x"', "route: expected a table"),
        ('route = ["echo.Echo"]', "route: expected SERVICE=TARGET, got 'echo.Echo'"),
        ('admin = "nowhere"', "admin: expected HOST:PORT or 'off', got 'nowhere'"),
        (
            'listen = "127.0.0.1:70000"',
            "listen: expected HOST:PORT, tls:HOST:PORT, h2c:HOST:PORT or unix:PATH, "
            "got '127.0.0.1:70000'",
        ),
        ("access_log_sample = 2", "access_log_sample: expected a number from 0 to 1, got '2'"),
        ("retry_budget_percent = 101", "retry_budget_percent: expected a percentage"),
        ("workers = 0", "workers: expected a positive integer, got '0'"),
        ('log_level = "loud"', "log_level: expected one of debug, info, warning, error"),
        ('log_format = "xml"', "log_format: expected one of json, console, got 'xml'"),
        ("health_check_interval = 0", "health_check_interval: expected a number of seconds > 0"),
        ("polcy = 'random'", "polcy: unknown setting (did you mean policy?)"),
        ("[balancing]\npolicy = 'random'", "balancing: unknown setting"),
        ("config = 'other.toml'", "config: unknown setting here"),
        ("policy = ", "not valid TOML"),
        ("policy = 'a'\npolicy = 'b'", "not valid TOML"),
    ],
)
def test_bad_file_names_the_file_and_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path, toml + "\n")
    message = error_of("--config", path)
    assert message.startswith(f"config file {path}: "), message
    assert expected in message, message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    message = error_of("--config", str(path))
    assert message == f"config file {path}: cannot read it: No such file or directory"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("GRPC_ETCD_PROXY_DRAIN_TIMEOUT", "soon", "expected a number of seconds >= 0, got 'soon'"),
        ("GRPC_ETCD_PROXY_DRAIN_TIMEOUT", "nan", "expected a number of seconds >= 0, got 'nan'"),
        ("GRPC_ETCD_PROXY_HEALTH_CHECK", "maybe", "expected true or false, got 'maybe'"),
        ("GRPC_ETCD_PROXY_POLICY", "foo", "expected one of round_robin, least_request, random"),
        ("GRPC_ETCD_PROXY_BACKEND", "127.0.0.1:1,bad", "expected HOST:PORT, got 'bad'"),
        ("GRPC_ETCD_PROXY_ROUTE", "a=b,c", "expected SERVICE=TARGET, got 'c'"),
        ("GRPC_ETCD_PROXY_MAX_RETRIES", "-1", "expected an integer >= 0, got '-1'"),
        (
            "GRPC_ETCD_PROXY_POLCY",
            "random",
            "unknown setting (did you mean GRPC_ETCD_PROXY_POLICY?)",
        ),
        ("GRPC_ETCD_PROXY_", "x", "unknown setting"),
    ],
)
def test_bad_variable_names_it(var: str, value: str, expected: str) -> None:
    message = error_of(env={var: value, "UNRELATED_VARIABLE": "ignored"})
    assert message.startswith(f"environment {var}: "), message
    assert expected in message, message


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--admin", "x"], "--admin: expected HOST:PORT or 'off', got 'x'"),
        (["--max-retries", "x"], "--max-retries: expected an integer >= 0, got 'x'"),
        (["--outlier-base-ejection", "0"], "--outlier-base-ejection: expected a number of seconds"),
        (["--backend", "ok:1", "--backend", "x:0"], "--backend: backend port must not be 0"),
        (["--log-format", "xml"], "--log-format: expected one of json, console, got 'xml'"),
    ],
)
def test_bad_flag_names_it(argv: list[str], expected: str) -> None:
    assert error_of(*argv).startswith(expected)


def test_checks_across_settings_name_where_each_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "outlier_base_ejection = 60\n")
    message = error_of("--config", path, "--outlier-max-ejection", "10")
    assert message.startswith("--outlier-max-ejection: must be at least outlier_base_ejection ("), (
        message
    )
    path = write(tmp_path, 'backend = ["127.0.0.1:1"]\nbounded_load = 1.5\n')
    message = error_of("--config", path, serve=True)
    assert f"bounded_load (config file {path}) needs --sticky-header" in message, message
    message = error_of(
        env={"GRPC_ETCD_PROXY_TARGET": "echo", "GRPC_ETCD_PROXY_BACKEND": "a:1"}, serve=True
    )
    assert message == "serve: GRPC_ETCD_PROXY_TARGET needs --etcd URL", message
    assert error_of(serve=True).startswith("serve: give --etcd URL --target NAME, or --backend")
