"""[storage] choosing the blob store, and check-config probing a bucket before the relay
relies on it: against a real S3-compatible server (tests/s3_server.py), each failure named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings
from gateway.config_check import check_config
from gateway.problems import Problem
from gateway.store.local_blobs import LocalBlobStore
from gateway.store.s3_blobs import S3BlobStore
from sealrelay.serve import file_store
from tests.cli_runner import sealrelay, write_config
from tests.s3_server import KEY_ID, REGION, SECRET, S3Server


def storage_config(tmp_path: Path, storage: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"[storage]\n{storage}")
    return path


def s3_storage(server: S3Server, bucket: str, secret_file: Path, secret: str = SECRET) -> str:
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    return (
        f'url = "s3://{bucket}/relay/blobs"\n'
        f'endpoint_url = "{server.endpoint_url}"\n'
        f'region = "{REGION}"\n'
        'addressing_style = "path"\n'
        f'access_key_id = "{KEY_ID}"\n'
        f'secret_access_key_file = "{secret_file}"\n'
    )


def storage_problems(path: Path) -> list[Problem]:
    settings, problems = check_config(path, environ={})
    assert settings is not None, problems
    return [p for p in problems if p.key.startswith("storage")]


def test_the_default_and_local_urls_keep_blobs_in_a_directory(tmp_path: Path) -> None:
    assert isinstance(file_store(load_settings(environ={})), LocalBlobStore)
    for url in (f"file://{tmp_path}/blobs", f"{tmp_path}/blobs"):
        settings = load_settings(storage_config(tmp_path, f'url = "{url}"\n'), environ={})
        store = file_store(settings)
        assert isinstance(store, LocalBlobStore)
        assert store.root == tmp_path / "blobs" == settings.storage.path


def test_an_s3_url_builds_the_s3_store(s3_server: S3Server, tmp_path: Path) -> None:
    path = storage_config(tmp_path, s3_storage(s3_server, "my-bucket", tmp_path / "secret"))
    settings = load_settings(path, environ={})
    store = file_store(settings)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == ("my-bucket", "relay/blobs/")
    assert store.location("a" * 64) == f"s3://my-bucket/relay/blobs/{'a' * 64}"


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ('url = "s3://"\n', "'' is not an S3 bucket name"),
        ('url = "s3://Not_A_Bucket/x"\n', "'Not_A_Bucket' is not an S3 bucket name"),
        ('url = "https://bucket.example/x"\n', "must be s3://bucket/prefix"),
        ('url = "s3://bucket/x?versioning=1"\n', "takes no ?query"),
        ('url = "s3://bucket"\nendpoint_url = "minio:9000"\n', "http:// or https:// URL"),
        ('url = "s3://bucket"\naddressing_style = "dns"\n', "'auto', 'virtual' or 'path'"),
        ('url = "s3://bucket"\naccess_key_id = "AK"\n', "go together"),
        ('url = "s3://bucket"\nsecret_access_key = "shh"\n', "unknown setting"),
        ('endpoint_url = "http://127.0.0.1:9000"\n', 'endpoint_url: only with url = "s3://'),
    ],
)
def test_bad_storage_settings_name_the_key(tmp_path: Path, storage: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(storage_config(tmp_path, storage), environ={})
    assert raised.value.problems[0].startswith("storage")
    assert message in raised.value.problems[0]


def test_check_config_passes_a_bucket_it_can_use(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    path = storage_config(tmp_path, s3_storage(s3_server, s3_bucket, tmp_path / "secret"))
    assert storage_problems(path) == []
    keys = s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert keys == []  # the probe's object is gone again


async def test_check_config_probes_from_inside_a_running_loop(
    s3_server: S3Server, tmp_path: Path
) -> None:
    path = storage_config(tmp_path, s3_storage(s3_server, "no-such-bucket", tmp_path / "s"))
    assert storage_problems(path) == [
        Problem(
            "storage.url", "cannot list s3://no-such-bucket/relay/blobs/: the bucket does not exist"
        )
    ]


def test_check_config_names_a_wrong_secret(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    with s3_server.refusing_unknown_keys() as (key_id, _):
        storage = s3_storage(s3_server, s3_bucket, tmp_path / "secret", "not the secret")
        path = storage_config(tmp_path, storage.replace(KEY_ID, key_id))
        [problem] = storage_problems(path)
    assert problem.key == "storage.url"
    assert problem.text.endswith("the secret access key is wrong")


def test_check_config_names_the_secret_file(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    path = storage_config(tmp_path, s3_storage(s3_server, s3_bucket, secret))
    secret.chmod(0o644)
    assert storage_problems(path) == [
        Problem(
            "storage.secret_access_key_file",
            f"{secret} can be read by other users; chmod 600 it",
            error=False,
        )
    ]
    secret.unlink()
    assert storage_problems(path) == [
        Problem("storage.secret_access_key_file", f"{secret}: no such file")
    ]


async def test_check_config_reports_an_unreachable_endpoint(tmp_path: Path) -> None:
    storage = (
        'url = "s3://bucket/relay"\nendpoint_url = "http://127.0.0.1:9"\n'
        'region = "us-east-1"\naccess_key_id = "k"\n'
        f'secret_access_key_file = "{tmp_path / "secret"}"\n'
    )
    (tmp_path / "secret").write_text("s")
    (tmp_path / "secret").chmod(0o600)
    run = await sealrelay("check-config", str(storage_config(tmp_path, storage)))
    assert run.code == 1
    assert "Error: config error: storage.url: cannot list s3://bucket/relay/: " in run.err
    assert "Could not connect to the endpoint URL" in run.err


async def test_the_sweep_command_deletes_old_blobs_from_the_bucket(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    storage = s3_storage(s3_server, s3_bucket, tmp_path / "secret")
    config.write_text(config.read_text().replace("[storage]\n", f"[storage]\n{storage}", 1))
    assert (await sealrelay("db", "upgrade", "-c", str(config))).code == 0
    store = s3_server.store(s3_bucket, "relay/blobs")
    old, young = await store.put(b"nobody names me"), await store.put(b"just written")
    await store.close()
    s3_server.set_written_at(
        s3_bucket, f"relay/blobs/{old}", datetime.now(UTC) - timedelta(days=30)
    )

    run = await sealrelay("links", "expire", "-c", str(config))
    assert run.code == 0, run.err
    assert "1 blob(s) deleted" in run.out
    assert "Unclosed" not in run.err  # the S3 client was closed
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"relay/blobs/{young}"]
