"""SPEC §6: the config is checked key by key; errors name file, table and key."""

import pytest

from wsgate.config import ConfigError, Secret, config_from_dict, load_config


def test_example_config_loads():
    cfg = load_config("config.example.toml")
    assert cfg.server.port == 8080
    assert cfg.auth.plugin == "static"
    assert cfg.broker.url == "memory://"
    assert cfg.audit.url == "sqlite:///wsgate-audit.db"


def test_defaults_live_in_one_place():
    cfg = config_from_dict({})
    assert cfg.server.ping_interval == 25.0
    assert cfg.server.ping_timeout == 10.0
    assert cfg.server.max_message_size == 65536
    assert cfg.server.max_output_buffer == 1048576
    assert cfg.permissions.plugin == "voipbin"


def write(tmp_path, text):
    path = tmp_path / "wsgate.toml"
    path.write_text(text)
    return path


def test_typo_in_key_names_file_table_and_key(tmp_path):
    path = write(tmp_path, '[server]\nprot = 8080\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "[server]" in message and "'prot'" in message


def test_unknown_table(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown table \[sever\]"):
        load_config(write(tmp_path, "[sever]\nport = 1\n"))


@pytest.mark.parametrize("text,fragment", [
    ('[server]\nport = "8080"\n', "[server] port: must be an integer, not a string"),
    ("[server]\nport = 70000\n", "[server] port: must be 1 to 65535"),
    ("[server]\nallowed_origins = \"https://a\"\n", "[server] allowed_origins: must be a list"),
    ("[server]\nallowed_origins = [\"app.example.com\"]\n", "is not an origin"),
    ("[server]\nping_interval = 5\nping_timeout = 6\n", "ping_timeout: must not be longer"),
    ("[ingest]\nkeys = [1]\n", "[ingest] keys[0]: must be a string"),
    ('[broker]\nurl = "amqp://x"\n', "[broker] url: must be memory:// or redis://"),
    ('[audit]\nwitness = "file:///w.jsonl"\n', "[audit] witness: must be a list"),
    ('[audit]\nwitness = ["w.jsonl"]\n', "[audit] witness[0]: 'w.jsonl' is not a witness URL"),
    ('[logging]\nlevel = "LOUD"\n', "[logging] level: must be one of"),
    ("[server]\nmax_subscriptions = true\n", "must be an integer, not a boolean"),
    # Every refused topic is an audit row: there is no "unlimited" (0) for this one.
    ("[server]\nmax_rejected_topics_per_minute = 0\n",
     "[server] max_rejected_topics_per_minute: must be at least 1"),
])
def test_wrong_types_and_values(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert fragment in str(info.value)


def test_env_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WSGATE_TEST_KEY", "s3cret")
    cfg = load_config(write(tmp_path, '[ingest]\nkeys = [{env = "WSGATE_TEST_KEY"}, "plain"]\n'))
    assert cfg.ingest.keys == ("s3cret", "plain")
    assert isinstance(cfg.ingest.keys[0], Secret)
    assert "s3cret" not in repr(cfg)


def test_missing_env_names_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("WSGATE_NOPE", raising=False)
    with pytest.raises(ConfigError, match="environment variable WSGATE_NOPE is not set"):
        load_config(write(tmp_path, '[ingest]\nkeys = [{env = "WSGATE_NOPE"}]\n'))


def test_env_in_plugin_options(tmp_path, monkeypatch):
    monkeypatch.setenv("WSGATE_JWT", "k")
    cfg = load_config(write(tmp_path, '[auth]\nplugin = "jwt"\n[auth.options]\n'
                                      'key = {env = "WSGATE_JWT"}\n'))
    assert cfg.auth.options["key"] == "k"


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
