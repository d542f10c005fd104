"""Reading checkpoints safely, bad files, atomic writes and bit-exact round trips."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from visiontune.checkpoint import (
    atomic_write,
    load_model,
    load_weights,
    read_checkpoint,
    save_model,
    save_weights,
)
from visiontune.errors import CheckpointError


def tiny_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, num_classes))


def snapshot(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before: dict) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


class Payload:
    """Unpickling this runs code: it would create the file named in ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
def test_save_weights_round_trips_bit_exactly(tmp_path, suffix):
    model = tiny_net()
    model[1].running_mean.normal_()  # buffers travel too
    path = save_weights(model, tmp_path / f"w{suffix}")
    loaded = read_checkpoint(path)
    assert list(loaded) == list(model.state_dict()) or set(loaded) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_save_weights_defaults_to_safetensors_and_handles_tied_weights(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # shared storage: safetensors' save_file refuses it as is
    path = save_weights(model, tmp_path / "tied")
    assert path.suffix == ".safetensors"
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert load_weights(fresh, path, match="name").complete
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_save_weights_rejects_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match=r"\.npz"):
        save_weights(tiny_net(), tmp_path / "w.npz")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"old and good")
    with pytest.raises(RuntimeError), atomic_write(target) as temporary:
        assert temporary.parent == tmp_path and temporary != target
        temporary.write_bytes(b"half writ")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old and good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "last.ckpt"
    with atomic_write(target) as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    from visiontune.atomic_io import atomic_files, write_bytes_atomically

    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("curves.png", "model.onnx"):
        (run_dir / name).symlink_to(victim)
    write_bytes_atomically(run_dir / "curves.png", b"png")
    with atomic_files(run_dir) as staging:  # writers that name their files themselves
        (staging / "model.onnx").write_bytes(b"onnx")
        (staging / "model.onnx.data").write_bytes(b"weights")
    assert victim.read_bytes() == b"someone else's file"
    assert not any(path.is_symlink() for path in run_dir.iterdir())
    assert sorted(path.name for path in run_dir.iterdir()) == ["curves.png", "model.onnx", "model.onnx.data"]
    assert (run_dir / "curves.png").read_bytes() == b"png"


def test_atomic_write_refuses_a_folder_in_the_way(tmp_path):
    from visiontune.atomic_io import write_text_atomically
    from visiontune.errors import VisiontuneError

    (tmp_path / "report.html").mkdir()
    with pytest.raises(VisiontuneError, match="folder of that name"):
        write_text_atomically(tmp_path / "report.html", "page")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html"]


def test_same_file_sees_through_links_and_relative_paths(tmp_path, monkeypatch):
    from visiontune.atomic_io import same_file

    original = tmp_path / "a.safetensors"
    original.write_bytes(b"x")
    os.symlink(original, tmp_path / "soft")
    os.link(original, tmp_path / "hard")
    monkeypatch.chdir(tmp_path)
    for other in ("soft", "hard", "./a.safetensors", str(original)):
        assert same_file(other, original), other
    assert not same_file(tmp_path / "new.safetensors", original)


def test_save_model_and_load_model_need_explicit_trust(tmp_path):
    model = tiny_net()
    path = save_model(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="allow_unsafe=True"):
        load_model(path)
    restored = load_model(path, allow_unsafe=True)
    assert isinstance(restored, nn.Sequential)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))


def test_whole_pickled_model_is_refused_by_load_weights_unless_allowed(tmp_path):
    path = save_model(tiny_net(), tmp_path / "whole.pth")
    target = tiny_net()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_weights(target, path)
    report = load_weights(target, path, allow_unsafe=True)
    assert report.complete and report.unwrapped_from == "whole pickled model"


# --- bad input: a one-paragraph error naming the file, and the model untouched ---------------------------


def write_truncated(path):
    torch.save(tiny_net().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_safetensors(path):
    save_weights(tiny_net(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def write_garbage(path):
    path.write_bytes(bytes(range(256)) * 4)


BAD_FILES = {
    "missing": (lambda path: None, "does not exist"),
    "empty": (lambda path: path.write_bytes(b""), "empty"),
    "truncated torch file": (write_truncated, "corrupt or truncated"),
    "truncated safetensors": (write_truncated_safetensors, "damaged"),
    "binary garbage": (write_garbage, "not a format"),
    "text file": (lambda path: path.write_text("epoch,loss\n1,0.5\n"), "text file"),
    "git lfs pointer": (lambda path: path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n"), "git lfs pull"),
    "html page": (lambda path: path.write_text("<!DOCTYPE html><html><body>Sign in</body></html>"), "HTML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_get_a_message_naming_the_file_and_leave_the_model_alone(tmp_path, case):
    write, expected = BAD_FILES[case]
    suffix = ".safetensors" if "safetensors" in case else ".pth"
    path = tmp_path / f"weights{suffix}"
    write(path)
    model = tiny_net()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as caught:
        load_weights(model, path)
    message = str(caught.value)
    assert str(path) in message and expected.lower() in message.lower()
    assert "\n" not in message
    assert_unchanged(model, before)


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="folder"):
        read_checkpoint(tmp_path)


def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    model = tiny_net()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as caught:
        load_weights(model, path)
    message = str(caught.value)
    assert str(path) in message and "run code" in message and ".safetensors" in message
    assert "posix.system" in message or "nt.system" in message
    assert not marker.exists()
    assert_unchanged(model, before)


def test_the_malicious_payload_is_real(tmp_path):
    """The control for the test above: unpickling the same file unsafely does run the code."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_training_checkpoints_with_argparse_namespaces_load_safely(tmp_path):
    import argparse

    path = tmp_path / "checkpoint.pth"
    model = tiny_net()
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1, model="tiny"), "epoch": 3}, path)
    report = load_weights(tiny_net(), path)
    assert report.complete and report.unwrapped_from == "model"


def test_same_file_is_false_for_a_symlink_loop(tmp_path):
    # Path.resolve raises RuntimeError on a loop; convert's own-input check must not become a traceback
    from visiontune.atomic_io import same_file

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert not same_file(loop, tmp_path / "out.safetensors")
