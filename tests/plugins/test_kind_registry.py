"""The kind registry: entry points (built-in and third-party), programmatic registration, loud rejections."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from deltaserve.plugins import registry
from deltaserve.plugins.bundle import read_bundle, write_bundle
from deltaserve.plugins.errors import BundleError, KindRegistryError
from deltaserve.plugins.kind import AppliedDelta, DeltaKind

THIRD_PARTY = '''
from deltaserve.plugins.kind import AppliedDelta, DeltaKind


class EchoKind(DeltaKind):
    """A kind shipped by someone else: valid when config.greeting is "hello"."""

    name = "echo"

    def validate(self, bundle, base):
        return [] if bundle.manifest.config.get("greeting") == "hello" else ['`config.greeting` must be "hello"']

    def apply(self, model, bundle):
        return AppliedDelta(model, lambda: None, "echo")
'''


class Fine(DeltaKind):
    name = "fine_kind"

    def validate(self, bundle, base):
        return []

    def apply(self, model, bundle):
        return AppliedDelta(model, lambda: None)


@pytest.fixture(autouse=True)
def fresh_registry():
    """Autouse fixtures are torn down after ``monkeypatch``: the reload sees the original sys.path."""
    yield
    sys.modules.pop("echokind", None)
    registry.reload()


def test_builtins_come_through_entry_points():
    declared = {ep.name: ep.value for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert declared["sparse"] == "deltaserve.plugins.sparse:SparseKind"
    kinds = registry.reload()
    assert {"lora", "sparse", "bottleneck"} <= set(kinds)
    assert (kinds["lora"].engine, kinds["sparse"].engine, kinds["bottleneck"].engine) == ("vllm_lora", "plan", "plan")


def test_third_party_kind_installs_through_an_entry_point(tmp_path, monkeypatch, base_spec):
    site = tmp_path / "site"
    (site / "echokind").mkdir(parents=True)
    (site / "echokind" / "__init__.py").write_text(THIRD_PARTY)
    dist_info = site / "echokind-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: echokind\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent("""\
        [deltaserve.plugins]
        echo = echokind:EchoKind
    """))  # fmt: skip
    out = write_bundle(
        tmp_path / "b",
        name="greet",
        kind="echo",
        base=base_spec,
        config={"greeting": "hello"},
        files={"notes.md": b"hi\n"},
        validate=False,
    )
    with pytest.raises(BundleError, match="unknown kind `echo`"):
        read_bundle(out, base=base_spec)

    monkeypatch.syspath_prepend(str(site))
    assert "echo" in registry.reload()
    bundle = read_bundle(out, base=base_spec)
    assert type(bundle.kind).__module__ == "echokind"
    bad = write_bundle(
        tmp_path / "bad", name="greet", kind="echo", base=base_spec, config={"greeting": "hi"}, files={}, validate=False
    )
    with pytest.raises(BundleError, match='`config.greeting` must be "hello"'):
        read_bundle(bad, base=base_spec)


def test_register_kind_rejects_duplicates_and_bad_names():
    with pytest.raises(KindRegistryError, match="kind `sparse` is already registered"):
        registry.register_kind(type("Sparse2", (Fine,), {"name": "sparse"}))
    for bad in ("Bad-Name", "1abc", "", "x" * 33):
        with pytest.raises(KindRegistryError, match="must match"):
            registry.register_kind(type("Bad", (Fine,), {"name": bad}))
    with pytest.raises(KindRegistryError, match="engine"):
        registry.register_kind(type("Odd", (Fine,), {"name": "odd", "engine": "sometimes"}))
    with pytest.raises(KindRegistryError, match="not a DeltaKind subclass"):
        registry.register_kind(object)  # type: ignore[arg-type]
    with pytest.raises(KindRegistryError, match="abstract"):
        registry.register_kind(type("Half", (DeltaKind,), {"name": "half"}))
    assert registry.register_kind(Fine) is Fine and registry.get_kind("fine_kind") is Fine
    registry.register_kind(Fine)  # the same class again is not a duplicate
    replacement = type("Sparse3", (Fine,), {"name": "sparse"})
    registry.register_kind(replacement, replace=True)
    assert registry.get_kind("sparse") is replacement


def test_unknown_kind_lists_known_ones():
    with pytest.raises(KindRegistryError, match="unknown kind `nope`; known kinds: `bottleneck`, `lora`, `sparse`"):
        registry.get_kind("nope")


def test_broken_entry_point_does_not_hide_the_others(tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist_info = site / "broken-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[deltaserve.plugins]\nbroken = no_such_module:Kind\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(RuntimeWarning, match="delta kind not registered"):
        kinds = registry.reload()
    assert "sparse" in kinds and "broken" not in kinds
    with pytest.raises(KindRegistryError, match="`broken` is installed but broken"):
        registry.get_kind("broken")
