"""Settings: TOML plus environment, validated once, one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, load_settings
from rules.policy import POLICY_FIELDS

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_embedded_defaults_are_the_dev_relay() -> None:
    settings = load_settings(environ={})
    assert settings.smtp.listen == ["127.0.0.1:2525"]
    assert settings.web.listen == "127.0.0.1:8080"
    assert settings.upstream.url == "capture:var/outbox"
    assert settings.database.url.startswith("sqlite+aiosqlite:///")
    assert settings.upstream.queue_lifetime == 5 * 86400
    assert not settings.smtp.allow_plaintext_auth_on_loopback


@pytest.mark.parametrize("name", ["sealrelay.toml", "dev.toml", "postfix-content-filter.toml"])
def test_shipped_examples_validate(name: str) -> None:
    settings = load_settings(EXAMPLES / name, environ={})
    assert isinstance(settings, Settings)


def test_the_example_config_shows_every_policy_setting() -> None:
    """IT learns the policy keys from the example: a new one must appear there too
    (letter_tags is [letter] tags)."""
    text = (EXAMPLES / "sealrelay.toml").read_text(encoding="utf-8")
    assert sorted(name for name in POLICY_FIELDS - {"letter_tags"} if f"{name} =" not in text) == []


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[smtp]\nmax_recipients = 7\nlisten = ["127.0.0.1:2600"]\n')
    env = {
        "SEALRELAY_SMTP__MAX_RECIPIENTS": "9",
        "SEALRELAY_SMTP__LISTEN": '["127.0.0.1:2700", "[::1]:2700"]',
        "SEALRELAY_UPSTREAM__URL": "smtps://mail.example.com:465",
        "UNRELATED": "x",
    }
    settings = load_settings(path, environ=env)
    assert settings.smtp.max_recipients == 9
    assert settings.smtp.listen == ["127.0.0.1:2700", "[::1]:2700"]
    assert settings.upstream.url == "smtps://mail.example.com:465"


def test_destination_concurrency_follows_a_lower_total_unless_set(tmp_path: Path) -> None:
    """Unset, it is 10, or the total when that is lower (a config from before it existed,
    with `concurrency = 4`, still starts); set, it is kept."""
    path = tmp_path / "c.toml"
    assert load_settings(environ={}).worker.concurrency == 20
    assert load_settings(environ={}).worker.destination_concurrency == 10
    assert load_settings(environ={}).upstream.connection_cache is None
    path.write_text("[worker]\nconcurrency = 4\n")
    assert load_settings(path, environ={}).worker.destination_concurrency == 4
    env = {"SEALRELAY_WORKER__CONCURRENCY": "3"}
    assert load_settings(path, environ=env).worker.destination_concurrency == 3
    path.write_text("[worker]\nconcurrency = 40\ndestination_concurrency = 40\n")
    assert load_settings(path, environ={}).worker.destination_concurrency == 40
    path.write_text("[worker]\nconcurrency = 40\n")
    assert load_settings(path, environ={}).worker.destination_concurrency == 10


def test_dkim_domains_from_file_are_lower_cased(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[dkim."Broker.Example"]\nselector = "s1"\nkey_file = "k.pem"\n')
    assert list(load_settings(path, environ={}).dkim) == ["broker.example"]


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("[smtp]\nmax_recipients = 0\n", {}, "smtp.max_recipients: Input should be greater"),
        ("[smtp]\nlisten = ['nope']\n", {}, "smtp.listen: 'nope' is not HOST:PORT"),
        ("[smtp]\ncolour = 'red'\n", {}, "smtp.colour: unknown setting"),
        ("[nonsense]\nx = 1\n", {}, "nonsense: unknown setting"),
        # a key nearly like one of its section's is named as what was likely meant
        (
            "[upstrem]\nurl = 'smtp://x:25'\n",
            {},
            "upstrem: unknown setting; did you mean upstream?",
        ),
        (
            "[smtp]\nmax_recipient = 10\n",
            {},
            "smtp.max_recipient: unknown setting; did you mean max_recipients?",
        ),
        (
            '[dkim."b.example"]\nselector = "s"\nkey_file = "k.pem"\nkey_fiel = "k.pem"\n',
            {},
            "dkim.b.example.key_fiel: unknown setting; did you mean key_file?",
        ),
        (
            "[[rules]]\nname = 'a'\n[rules.set]\nregistered_leter = true\n",
            {},
            "rules.0.set.registered_leter: unknown setting; did you mean registered_letter?",
        ),
        (
            "",
            {"SEALRELAY_WORKER__CONCURENCY": "3"},
            "worker.concurency: unknown setting; did you mean concurrency?"
            " (from SEALRELAY_WORKER__CONCURENCY)",
        ),
        ("[upstream]\nurl = 'http://x'\n", {}, "upstream.url: must be smtp://"),
        ("[upstream]\nurl = 'capture:'\n", {}, "upstream.url: capture: needs a directory"),
        ("[server]\npublic_url = 'ftp://x'\n", {}, "server.public_url: must be an http"),
        ("[database]\nurl = 'mysql://x'\n", {}, "database.url: must start with"),
        (
            "[[groups]]\nname = 'g'\nletter_block_set = 'lawyer'\n",
            {},
            "config: group g: letter_block_set 'lawyer' is not in letter.block_sets",
        ),
        ("[web]\ntrusted_proxies = ['10.0.0.0/8', 'proxy']\n", {}, "web.trusted_proxies: 'proxy'"),
        ("[web]\nvisit_db_limit = 0\n", {}, "web.visit_db_limit: Input should be greater than"),
        ("[web]\nvisit_db_limit = 6\n", {}, "web.visit_db_limit: Input should be less than"),
        ("[web]\nvisit_wait = 0\n", {}, "web.visit_wait: Input should be greater than 0"),
        ("[smtp]\ntls_cert = 'a.pem'\n", {}, "smtp: Value error, tls_cert and tls_key go together"),
        (
            "[smtp]\nimplicit_tls_listen = ['0.0.0.0:465']\n",
            {},
            "smtp: Value error, implicit_tls_listen needs tls_cert",
        ),
        (
            "",
            {"SEALRELAY_SMTP__MAX_MESSAGE_SIZE": "big"},
            "smtp.max_message_size: 'big' is not a size: bytes, or a number with a unit"
            " (50MiB, 2MB) (from SEALRELAY_SMTP__MAX_MESSAGE_SIZE)",
        ),
        ("[dkim.'a.example']\nselector = 'bad selector'\nkey_file = 'k'\n", {}, "dkim.a.example"),
        (
            "[dkim.'A.example']\nselector = 's1'\nkey_file = 'k'\n"
            "[dkim.'a.EXAMPLE']\nselector = 's2'\nkey_file = 'k'\n",
            {},
            "dkim: Value error, [dkim] names a.example more than once (case is ignored)",
        ),
        (
            "[console]\nidle_timeout = 7200\nabsolute_timeout = 3600\n",
            {},
            "console: Value error, idle_timeout must not exceed absolute_timeout",
        ),
        ("[console]\nidle_timeout = 10\n", {}, "console.idle_timeout: Input should be greater"),
        ("[console]\nremember_me = true\n", {}, "console.remember_me: unknown setting"),
        ("[worker]\nconcurrency = 0\n", {}, "worker.concurrency: Input should be greater"),
        ("[worker]\nconcurrency = -3\n", {}, "worker.concurrency: Input should be greater"),
        ("[worker]\nconcurrency = 1001\n", {}, "worker.concurrency: Input should be less"),
        (
            "[worker]\ndestination_concurrency = 0\n",
            {},
            "worker.destination_concurrency: Input should be greater than or equal to 1",
        ),
        (
            "",
            {"SEALRELAY_WORKER__DESTINATION_CONCURRENCY": "-1"},
            "worker.destination_concurrency: Input should be greater than or equal to 1"
            " (from SEALRELAY_WORKER__DESTINATION_CONCURRENCY)",
        ),
        (
            "[worker]\ndestination_concurrency = 'ten'\n",
            {},
            "worker.destination_concurrency: Input should be a valid integer",
        ),
        (
            "[worker]\nconcurrency = 4\ndestination_concurrency = 5\n",
            {},
            "worker.destination_concurrency: 5 is more than concurrency (4), the sends to all"
            " destinations together; lower it or raise concurrency",
        ),
        (
            "[worker]\ndestination_concurrency = 21\n",
            {},
            "worker.destination_concurrency: 21 is more than concurrency (20)",
        ),
        ("[upstream]\nconnection_cache = -1\n", {}, "upstream.connection_cache: Input should be"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], expected: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=env)
    message = str(caught.value)
    assert message.startswith(expected.split(":")[0])
    assert expected.replace("Value error, ", "") in message.replace("Value error, ", "")
    assert "\n" not in message


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, environ={})


def test_environment_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not name a setting"):
        load_settings(
            environ={
                "SEALRELAY_SMTP__MAX_RECIPIENTS": "5",
                "SEALRELAY_SMTP__MAX_RECIPIENTS__X": "1",
            }
        )


def test_sizes_take_units_everywhere(tmp_path: Path) -> None:
    """As the policy's sizes do: IT writes "50MiB" for the message size too."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[smtp]\nmax_message_size = "50MiB"\ndata_in_memory = "32MB"\n'
        '[storage]\ninline_max_bytes = "64KiB"\n[policy]\nlink_attachments_over = "1MiB"\n'
    )
    settings = load_settings(path, environ={"SEALRELAY_SMTP__MAX_RECIPIENTS": "5"})
    assert settings.smtp.max_message_size == 50 * 1024 * 1024
    assert settings.smtp.data_in_memory == 32_000_000
    assert settings.storage.inline_max_bytes == 64 * 1024
    env = {"SEALRELAY_SMTP__MAX_MESSAGE_SIZE": "10MB"}
    assert load_settings(path, environ=env).smtp.max_message_size == 10_000_000
    path.write_text('[smtp]\nmax_message_size = "50 apples"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    assert "smtp.max_message_size: '50 apples' is not a size" in str(refused.value)
