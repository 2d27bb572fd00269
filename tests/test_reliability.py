"""What a hostile-but-fair user can do to a run: a checkpoint file or URL that would run code, weights that
diverge in an epoch's last step, a second run into a finished run's directory, a resume with changed data
settings, and the small failures that must end in a message naming the fix."""
import contextlib
import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
FAST = ["--run.logger=csv", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
        "--evaluation.kmeans_restarts=1", "--evaluation.nmi=false", "--trainer.limit_train_batches=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(run_dir, *extra):
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/isif/digits.yaml", "--run.dir", str(run_dir), *FAST, *extra])


@pytest.fixture(autouse=True)
def _own_run_dir(monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)


@contextlib.contextmanager
def serving(folder: Path):
    """An HTTP server for `folder` on 127.0.0.1 (an ephemeral port), in a thread; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def hostile_checkpoint(path: Path, sentinel: Path) -> Path:
    """A checkpoint whose unpickling would create `sentinel` (any code could stand there)."""
    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {}, "payload": Payload()}, path)
    return path


# -- 1. checkpoints load with weights_only, URLs included -------------------------------------------
def test_a_hostile_checkpoint_url_never_runs_and_the_error_names_the_url(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "served" / "evil.ckpt", sentinel)
    with serving(tmp_path / "served") as base, pytest.raises(SystemExit) as stop:
        train(tmp_path / "run", "--trainer.max_epochs=1", f"--ckpt_path={base}/evil.ckpt")
    err = capsys.readouterr().err
    assert stop.value.code != 0 and not sentinel.exists()
    assert f"{base}/evil.ckpt refused, nothing in it was run" in err
    assert "weights_only" not in err  # no advice to load it the unsafe way
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_a_hostile_local_checkpoint_never_runs_and_the_error_names_the_file(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", sentinel)
    with pytest.raises(SystemExit):
        train(tmp_path / "run", "--trainer.max_epochs=1", f"--ckpt_path={evil}")
    err = capsys.readouterr().err
    assert f"{evil} refused, nothing in it was run" in err and "weights_only" not in err
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_a_url_checkpoint_is_downloaded_into_the_run_and_named_in_its_config(tmp_path, capsys):
    """Two servers each serve a `last.ckpt`: the run resumes from the one its URL names (torch.hub's cache,
    keyed by the file name, loaded the first server's file for the second URL)."""
    train(tmp_path / "first", "--trainer.max_epochs=1")
    wanted = (tmp_path / "first" / "checkpoints" / "last.ckpt").read_bytes()
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    torch.save({"epoch": 0}, decoy / "last.ckpt")
    with serving(decoy) as decoy_url, serving(tmp_path / "first" / "checkpoints") as url:
        with pytest.raises(SystemExit):  # the decoy is no Lightning checkpoint: refused before training
            train(tmp_path / "decoy_run", "--trainer.max_epochs=2", f"--ckpt_path={decoy_url}/last.ckpt")
        train(tmp_path / "run", "--trainer.max_epochs=2", f"--ckpt_path={url}/last.ckpt")
    copy = tmp_path / "run" / "downloads" / "last.ckpt"
    assert copy.read_bytes() == wanted
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"ckpt_path: {url}/last.ckpt" in config
    assert f"downloaded to {copy} (sha256 {hashlib.sha256(wanted).hexdigest()})" in config
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
