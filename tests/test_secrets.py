"""Passwords never reach a log line, an error message or `status --json`, whatever
characters they hold and wherever in the URL they are given."""

from __future__ import annotations

from pathlib import Path

import pytest

from delayq.settings import mask_url
from tests.harness import clean_env, run_cli
from tests.servers import RedisServer, free_port

SECRET = "Zq7-secret"

LEAKY_URLS = [
    # Characters SQLAlchemy accepts unencoded in a password, which end a URL's netloc.
    f"mysql+pymysql://u:pa#{SECRET}@db.example:3306/shop",
    f"mysql+pymysql://u:{SECRET}#x@db.example/shop",
    f"mysql+pymysql://u:pa/{SECRET}@db.example/shop",
    f"mysql+pymysql://u:pa?{SECRET}@db.example/shop?charset=utf8mb4",
    f"postgresql+psycopg://u:p@{SECRET}@db.example/shop",
    f"postgresql+psycopg://u:a:b:{SECRET}@db.example/shop",
    f"postgresql+psycopg://u:{SECRET}%40%2F%3F%23@db.example/shop",
    f"redis://:pa#{SECRET}@127.0.0.1:6379/0",
    f"redis://default:{SECRET}/x?y#z@cache:6379/0",
    f"rediss://:{SECRET}@cache:6380/0?ssl_cert_reqs=required",
    f"unix://:{SECRET}@/run/redis/redis.sock?db=0",
    # Secrets in the query string, under any name a driver reads them from.
    f"mysql+pymysql://u@db/shop?ssl_key=/k.pem&ssl_key_password={SECRET}",
    f"mysql+pymysql://u@db/shop?ssl_password={SECRET}&charset=utf8mb4",
    f"redis://cache/0?password={SECRET}",
    f"redis://cache/0?PASSWORD={SECRET}",
    f"redis://cache/0?passwd={SECRET}",
    f"postgresql+psycopg://db/shop?sslpassword={SECRET}",
    f"https://hook.example/x?api_token={SECRET}&client_secret={SECRET}",
    f"redis://cache/0?password={SECRET}&{SECRET}2",
    f"redis://cache/0?password=a%26{SECRET}",
    # Malformed ones: masked all the same, never raising.
    f"mysql+pymysql://root:{SECRET}@127.0.0.1:xx/db",
    f"redis://:{SECRET}@[::1",
    f"u:{SECRET}@host",
    f"mysql+pymysql://u:{SECRET}@",
    f"://:{SECRET}@",
]


@pytest.mark.parametrize("url", LEAKY_URLS)
def test_mask_url_never_lets_a_password_through(url: str) -> None:
    masked = mask_url(url)
    assert SECRET not in masked, masked
    assert "***" in masked, masked


@pytest.mark.parametrize(
    "url",
    [
        "unix:///run/redis/redis.sock?db=0",
        "unix:///tmp/delayq-1000/redis.sock?db=3",
        "sqlite:////var/lib/delayq/delayq.db",
        "sqlite:///relative/delayq.db",
        "sqlite://",
        "redis://127.0.0.1:6379/0",
        "redis://[::1]:6379/0",
        "mysql+pymysql://app@db.example:3306/shop?charset=utf8mb4&ssl_ca=/etc/ca.pem",
    ],
)
def test_mask_url_keeps_urls_without_secrets_intact(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_keeps_user_host_and_database_around_the_masked_password() -> None:
    masked = mask_url(f"mysql+pymysql://app:pa#{SECRET}@db.example:3306/shop?charset=utf8mb4")
    assert masked == "mysql+pymysql://app:***@db.example:3306/shop?charset=utf8mb4"
    masked = mask_url(f"mysql+pymysql://app@db/shop?ssl_key_password={SECRET}&charset=utf8mb4")
    assert masked == "mysql+pymysql://app@db/shop?ssl_key_password=***&charset=utf8mb4"


def test_commands_with_an_unreachable_database_whose_password_has_a_hash_print_no_secret(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Nothing listens on this port: every command that needs the database reports it.
    url = f"mysql+pymysql://app:pa#{SECRET}@127.0.0.1:{free_port()}/shop"
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=url, HOME=str(tmp_path))
    for args in (("check",), ("status", "--json"), ("migrate",), ("inspect", "A1")):
        done = run_cli(*args, env=env)
        assert done.returncode == 3, (args, done.stdout, done.stderr)
        assert SECRET not in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("delayq: error: database at mysql+pymysql://app:***@")
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:pa#{SECRET}@127.0.0.1:6379/0",
        f"redis://app:pa/{SECRET}@127.0.0.1:6379/0",
        f"redis://app:pa?{SECRET}@127.0.0.1:6379/0",
    ],
)
def test_a_redis_url_with_a_hash_in_its_password_is_refused_without_echoing_it(
    url: str, tmp_path: Path
) -> None:
    # redis-py cannot parse these (the password must be percent-encoded): refused up
    # front, before anything connects, in one line without the password.
    env = clean_env(REDIS_URL=url, HOME=str(tmp_path))
    done = run_cli("status", "--json", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr, done.stderr
    assert done.stderr.startswith("delayq: error: DELAYQ_REDIS_URL: redis://")
    assert len(done.stderr.splitlines()) == 1
