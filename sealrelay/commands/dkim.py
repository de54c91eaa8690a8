"""`sealrelay dkim`: DKIM signing keys."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.mail import dkim


@click.group("dkim")
def dkim_group() -> None:
    """DKIM signing keys."""


@dkim_group.command("keygen")
@click.option("--domain", required=True, help="The sender domain the key signs for.")
@click.option("--selector", required=True, help="The DNS selector, e.g. 2026a.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the private key (default var/dkim/DOMAIN.SELECTOR.pem).",
)
def dkim_keygen(domain: str, selector: str, out: Path | None) -> None:
    """Write a new 2048-bit key and print its DNS record and config lines."""
    path = out or Path("var/dkim") / f"{domain}.{selector}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = dkim.generate_private_key()
    try:
        dkim.write_private_key(key, path)
    except dkim.DkimError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"private key written to {path}\n")
    click.echo("Publish this DNS record:\n")
    click.echo(dkim.dns_txt_record(key, selector, domain))
    click.echo("\nand add to the config:\n")
    click.echo(f'[dkim."{domain}"]\nselector = "{selector}"\nkey_file = "{path}"')
