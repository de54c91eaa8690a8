"""A letter never shows a prospect a placeholder such as {commission}.

Texts whose placeholders have no value stop `sealrelay check-config` and `sealrelay serve`
(real processes) and the relay itself, naming block set, language, file and placeholder; the
dev config of `make run` fills demo values and passes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from gateway.letters.blocks import BlockSetError
from gateway.texts.files import SHIPPED_BLOCK_SET as SHIPPED
from tests.cli_runner import sealrelay, write_config
from tests.conftest import StartRelay
from tests.support import Sink

REPOSITORY = Path(__file__).parents[2]
FILLED = (
    "[letter]\n"
    'company_address = "Musterstraße 1, 80331 München"\n'
    'company_email = "widerruf@broker.example"\n'
    'company_phone = "+49 89 123456"\n'
)


def custom_block_set(directory: Path) -> Path:
    """A copy of the shipped set with a misspelt placeholder and one in the wrong place."""
    shutil.copytree(SHIPPED, directory)
    withdrawal = directory / "de" / "widerruf.md"
    withdrawal.write_text(
        withdrawal.read_text(encoding="utf-8") + "\nIhr Makler: {agent}\n", encoding="utf-8"
    )
    terms = directory / "en" / "terms.md"
    terms.write_text(
        terms.read_text(encoding="utf-8") + "\nThis concerns {subject}.\n", encoding="utf-8"
    )
    return directory


async def test_check_config_names_every_placeholder_without_a_value(tmp_path: Path) -> None:
    custom = custom_block_set(tmp_path / "custom")
    config = write_config(
        tmp_path,
        extra=FILLED
        + f'block_sets = {{ custom = "{custom}" }}\n'
        + "[policy]\n"
        + 'letter_block_set = "custom"\n'
        + "[[groups]]\n"
        + 'name = "commercial"\n'
        + 'letter_block_set = "default"\n'
        + "[smtp]\nallow_plaintext_auth_on_loopback = true\n",
    )
    run = await sealrelay("check-config", str(config))
    assert (run.code, run.out) == (1, "")
    lines = run.err.strip().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("Error:")) :]
    assert lines[0] == (
        "Error: config error: letter.block_sets: letter texts hold placeholders that would reach"
        " prospects as written:"
    )
    problems = [line.strip() for line in lines[1:]]
    assert 'letter block set "custom", language de: {agent} in widerruf.md: not a placeholder' in (
        " ".join(problems)
    )
    assert (
        'letter block set "custom", language en: {subject} in terms.md: {subject} is filled'
        " only in letter_subject, greeting, intro, outro"
    ) in problems
    for name, language, file in (
        ("custom", "de", "bedingungen.md"),
        ("custom", "es", "condiciones.md"),
        ("default", "en", "terms.md"),
    ):
        assert (
            f'letter block set "{name}", language {language}: {{commission}} in {file}'
            " has no value: set [letter] commission"
        ) in problems
    assert not any("{company_phone} in" in problem for problem in problems)  # it has a value


async def test_check_config_is_ok_once_every_placeholder_has_a_value(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        extra=FILLED
        + 'commission = "3,57 %"\n'
        + "[smtp]\nallow_plaintext_auth_on_loopback = true\n",
    )
    run = await sealrelay("check-config", str(config))
    assert run.code == 0, run.err


async def test_make_run_config_fills_demo_values(tmp_path: Path) -> None:
    """As `make run` does it: the demo DKIM key first, then the dev config checks out."""
    key = "var/dkim/demo.sealrelay.example.dev.pem"
    made = await sealrelay(
        "dkim",
        "keygen",
        "--domain",
        "demo.sealrelay.example",
        "--selector",
        "dev",
        "--out",
        key,
        cwd=tmp_path,
    )
    assert made.code == 0, made.err
    run = await sealrelay("check-config", str(REPOSITORY / "examples" / "dev.toml"), cwd=tmp_path)
    assert run.code == 0, run.err


async def test_serve_refuses_to_start_with_a_placeholder_without_value(tmp_path: Path) -> None:
    run = await sealrelay("serve", "--config", str(write_config(tmp_path, letter=False)))
    assert run.code == 1
    assert (
        'letter block set "default", language de: {company_phone} in widerruf.md has no value:'
        " set [letter] company_phone"
    ) in run.err


async def test_the_relay_never_starts_with_unfilled_letter_texts(
    relay_factory: StartRelay, sink: Sink
) -> None:
    with pytest.raises(BlockSetError) as refused:
        await relay_factory(letter={"company_email": ""})
    message = str(refused.value)
    for language, files in (
        ("de", "widerruf.md, datenschutz.md"),
        ("en", "withdrawal.md, privacy.md"),
        ("es", "desistimiento.md, privacidad.md"),
    ):
        assert (
            f'letter block set "default", language {language}: {{company_email}} in {files}'
            " has no value: set [letter] company_email"
        ) in message
    assert sink.messages == []


async def test_the_letters_never_name_sealrelay_as_the_broker(tmp_path: Path) -> None:
    """`[branding] company_name` defaults to sealrelay's own name, which brands a page but
    would make the letters' texts name the wrong contracting party: unset, it stops
    check-config (and so serve) as a missing address does."""
    config = write_config(
        tmp_path,
        extra=FILLED
        + 'commission = "3,57 %"\n'
        + '[branding]\nprimary_color = "#1f4e79"\n'
        + "[smtp]\nallow_plaintext_auth_on_loopback = true\n",
    )
    run = await sealrelay("check-config", str(config))
    assert run.code == 1
    for language in ("de", "en", "es"):
        assert re.search(
            rf'letter block set "default", language {language}: \{{company\}} in [^\n]+'
            r" has no value: set \[branding\] company_name",
            run.err,
        ), run.err
    named = config.read_text(encoding="utf-8").replace(
        "[branding]\n", '[branding]\ncompany_name = "Müller Immobilien GmbH"\n'
    )
    config.write_text(named, encoding="utf-8")
    run = await sealrelay("check-config", str(config))
    assert run.code == 0, run.err
