"""``deltaserve serve``'s options reach the server's configuration (the server itself is not started here)."""

from __future__ import annotations

from click.testing import CliRunner


def test_max_bundle_size_sets_the_registration_limit(tiny_base, tmp_path, monkeypatch):
    import deltaserve.server.app as app
    from deltaserve.client.cli import main

    seen = []

    async def fake_serve(config):
        seen.append(config)

    monkeypatch.setattr(app, "serve", fake_serve)
    args = ["serve", "--base", str(tiny_base), "--store", str(tmp_path / "store")]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--max-bundle-size", "1536"]).exit_code == 0
    assert [c.max_bundle_bytes for c in seen] == [512 * 1024 * 1024, 1536 * 1024 * 1024]
    assert CliRunner().invoke(main, [*args, "--max-bundle-size", "0"]).exit_code != 0
