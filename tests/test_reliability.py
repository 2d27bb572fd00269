"""What a hostile-but-fair user can do to a run: a checkpoint file or URL that would run code, weights that
diverge in an epoch's last step, a second run into a finished run's directory, a resume with changed data
settings, and the small failures that must end in a message naming the fix."""
import contextlib
import functools
import hashlib
import http.server
import os
import re
import stat
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.cross_pairs import PairTable, cache_key
from callbacks.evaluation import EmbeddingEvaluator
from datamodules.base import load_image
from datamodules.digits import DigitsDataModule
from datamodules.folder import ClassFolderWarning, class_folders, scan_class_folders
from embedding_core import metrics
from experiments.train import RUN_DIR_ENV, AtomicCheckpointIO, FiniteWeightsOnly, last_checkpoint, main
from lightning_modules.isif import ISIF
from tests.fixtures import write_jpeg

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


# -- 2. non-finite embeddings and weights ---------------------------------------------------------
def one_nan(n: int = 40, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    emb[3, 0] = float("nan")
    return emb, torch.arange(n) % 4


def test_every_metric_refuses_embeddings_holding_a_nan():
    emb, target = one_nan()
    with pytest.raises(FloatingPointError, match="queries: 1 of 40 rows hold NaN or inf"):
        metrics.recall_at_k(emb, target, [1, 2])
    with pytest.raises(FloatingPointError, match="gallery: 40 of 40 rows hold NaN or inf"):
        metrics.recall_at_k(emb.nan_to_num(), target, [1], torch.full((40, 8), float("inf")), target)
    with pytest.raises(FloatingPointError, match="reference: 1 of 40 rows"):
        metrics.weighted_knn_top1(emb.nan_to_num(), target, emb, target, k=5)
    with pytest.raises(FloatingPointError, match="1 of 40 rows hold NaN or inf"):
        metrics.nmi(emb, target, restarts=1)
    everything_nan = torch.full((40, 8), float("nan"))  # what the old code scored Recall@K = 100 at every K
    with pytest.raises(FloatingPointError):
        metrics.recall_at_k(everything_nan, target, [1])


class DivergesAtLastStep(ISIF):
    """ISIF whose weights become NaN after the optimizer step of `epoch`'s last batch (its loss was finite)."""

    def __init__(self, epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.diverge_epoch = epoch

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.current_epoch == self.diverge_epoch and batch_idx == self.trainer.num_training_batches - 1:
            with torch.no_grad():
                self.head.linear.weight.fill_(float("nan"))


class BytesAtEpochStart(L.Callback):
    def __init__(self, path: Path):
        self.path, self.seen = path, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen[trainer.current_epoch] = self.path.read_bytes() if self.path.is_file() else None


@pytest.mark.parametrize("validate", [True, False], ids=["evaluated", "not-evaluated"])
def test_weights_that_diverge_in_an_epochs_last_step_stop_the_run_and_keep_the_last_checkpoint(tmp_path, validate):
    L.seed_everything(0)
    model = DivergesAtLastStep(1, backbone="small_cnn", in_chans=1, embedding_dim=16)
    last = tmp_path / "last.ckpt"
    before = BytesAtEpochStart(last)
    evaluator = EmbeddingEvaluator(recall_ks=[1], knn_k=5, nmi=False)
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1.0 if validate else 0,
                        num_sanity_val_steps=0, callbacks=[evaluator, last_checkpoint(str(tmp_path)),
                                                           FiniteWeightsOnly(), before],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(FloatingPointError) as stop:
        trainer.fit(model, DigitsDataModule(batch_size=32, num_workers=0, eval_batch_size=512))
    problem = "reference embeddings: 1437 of 1437 rows hold NaN" if validate else "non-finite weights (head."
    assert problem in str(stop.value) and f"the last good checkpoint is kept: {last}" in str(stop.value)
    assert before.seen[1] is not None and last.read_bytes() == before.seen[1]  # epoch 0's, byte for byte
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_a_run_whose_lr_explodes_in_the_epochs_only_step_exits_with_the_divergence(tmp_path):
    """The issue's run: one step per epoch, the step schedule multiplies the lr by 1e30 from epoch 1. The
    old code evaluated the exploded network (Recall@1 = 100), saved it as epoch 1 and stopped a step later."""
    with pytest.raises(FloatingPointError, match="embeddings: 1437 of 1437 rows hold NaN or inf") as stop:
        train(tmp_path / "run", "--trainer.limit_train_batches=0.1", "--model.schedule.milestones=[1]",
              "--model.schedule.factors=[1e30]", "--trainer.max_epochs=3")
    assert "at epoch 1" in str(stop.value)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "run" / "final_metrics.json").exists()


# -- 3. a run directory that holds a run ------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_finished_runs_directory_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    train(run, "--trainer.max_epochs=1")
    before = snapshot(run)
    assert {"config.yaml", "final_metrics.json", "checkpoints/last.ckpt", "csv/metrics.csv"} <= before.keys()
    with pytest.raises(FileExistsError, match=r"already holds a run .*--ckpt_path=.*last\.ckpt.*--run\.overwrite=true"):
        train(run, "--trainer.max_epochs=1", "--model.optim.lr=0.1")
    assert snapshot(run) == before


def test_two_runs_started_in_the_same_second_with_the_same_default_name_get_two_directories(tmp_path, monkeypatch):
    """The default name's random suffix drawn twice alike: the second run takes the next name, never the folder."""
    import experiments.train as train_module

    repo = Path(__file__).parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module.time, "strftime", lambda fmt, *a: "20250101-000000")
    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(train_module.secrets, "token_hex", lambda n: next(suffixes))
    for _ in range(2):
        monkeypatch.delenv(RUN_DIR_ENV, raising=False)
        main(["fit", "--config", f"{repo}/{CONFIGS}/base.yaml", "--config", f"{repo}/{CONFIGS}/datasets/digits.yaml",
              "--config", f"{repo}/{CONFIGS}/isif/digits.yaml", *FAST, "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"])
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["isif-digits-20250101-000000-aaaaaa", "isif-digits-20250101-000000-bbbbbb"]
    assert all((tmp_path / "runs" / r / "final_metrics.json").is_file() for r in runs)


# -- 4. a resume with changed data settings ------------------------------------------------------
def test_a_resume_that_changes_the_protocol_is_refused_naming_the_change_and_others_are_printed(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, "--trainer.max_epochs=1")
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert saved["class_path"] == "datamodules.digits.DigitsDataModule" and saved["protocol"] == "seen"
    last = run / "checkpoints" / "last.ckpt"
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train(run, "--trainer.max_epochs=2", "--data.protocol=unseen", f"--ckpt_path={last}")
    err = capsys.readouterr().err
    assert "data.protocol: 'seen' -> 'unseen'" in err and "initial and best metrics" in err
    assert snapshot(run) == before
    train(run, "--trainer.max_epochs=2", "--data.batch_size=64", f"--ckpt_path={last}")
    assert "data.batch_size: 128 -> 64" in capsys.readouterr().out  # printed like the model's; this run's wins


# -- 6. the small ones: each a message naming the fix ---------------------------------------------
@pytest.mark.parametrize("how", ["dev-full-small", "dev-full-large", "zip-writer"])
def test_a_full_disk_during_a_save_gives_the_free_space_hint_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                              how):
    """A full disk reaches the save as OSError(ENOSPC) or, when torch's zip writer meets it first, as
    RuntimeError('[enforce fail at inline_container.cc] ...'), which was not caught (no free-space hint)."""
    from datamodules import files

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    def full_disk(fd, mode):
        os.close(fd)
        return open("/dev/full", mode)  # every write: ENOSPC

    def zip_writer_fails(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    if how == "zip-writer":
        monkeypatch.setattr(torch, "save", zip_writer_fails)
    else:
        monkeypatch.setattr(files.os, "fdopen", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt .*MiB free in .*Free space"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(10 if how.endswith("small") else 10**5)},
                                             path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_saved_checkpoints_take_the_umask_not_0600(tmp_path, umask):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o666 & ~umask


def tiny_table() -> PairTable:
    n, k, m = 3, 1, 2
    return PairTable(np.array([[1], [0], [-1]]), np.full((n, k), 25), np.zeros((n, k, 4), np.float32),
                     np.zeros((n, k, 4), np.float32), np.zeros((n, k, m, 2), np.float32),
                     np.zeros((n, k, m, 2), np.float32), np.full((n, k), m), np.zeros((n, k, 2, 3), np.float32))


def test_the_cross_pairs_cache_is_atomic_keyed_on_content_and_a_truncated_one_is_named(tmp_path):
    path = tmp_path / "pairs-x.npz"
    tiny_table().save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs-x.npz"]  # no temporary file left
    assert PairTable.load(path).partner.tolist() == [[1], [0], [-1]]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"cross-pairs cache {path} is unreadable.*delete it"):
        PairTable.load(path)
    image = tmp_path / "a.jpg"
    write_jpeg(image, 0)
    key = cache_key([str(image)], np.array([0]), {})
    write_jpeg(image, 1, size=(20, 18))  # another image under the same name
    assert cache_key([str(image)], np.array([0]), {}) != key


def test_a_self_referencing_symlink_in_a_class_folder_is_skipped_with_a_warning_and_gif_is_read(tmp_path):
    for name in ("cat", "dog"):
        for i in range(2):
            write_jpeg(tmp_path / name / f"{i}.jpg", i)
    Image.fromarray(np.full((12, 10, 3), 200, np.uint8)).save(tmp_path / "dog" / "2.gif")
    os.symlink("loop.jpg", tmp_path / "cat" / "loop.jpg")  # ELOOP when followed
    os.symlink("knot", tmp_path / "knot")  # a class-level loop
    with pytest.warns(ClassFolderWarning, match="cannot be followed") as caught:
        records = scan_class_folders(tmp_path, class_folders(tmp_path))
    classes = sorted({Path(p).parent.name for p in records.items})
    assert classes == ["cat", "dog"]
    assert {str(tmp_path / "knot"), str(tmp_path / "cat" / "loop.jpg")} <= {
        str(w.message).split(" skipped")[0].removeprefix("folder dataset: ") for w in caught}
    assert [Path(p).name for p in records.items] == ["0.jpg", "1.jpg", "0.jpg", "1.jpg", "2.gif"]
    assert load_image(records.items[-1]).size == (10, 12)


def test_a_misspelt_trainer_key_that_is_a_prefix_of_a_real_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path / "run", "--trainer.max_epoch=1")
    assert "--trainer.max_epoch: did you mean --trainer.max_epochs?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flag", "message"), [
    ("--data.batch_size=-5", "--data.batch_size -5: use a positive number"),
    ("--model.optim.lr=-1", "--model.optim: Invalid learning rate: -1"),
    ("--evaluation.knn_k=0", "use k >= 1"),
    ("--run.logger=cvs", "--run.logger 'cvs': use one of wandb, csv, none"),
])
def test_bad_settings_fail_before_the_run_directory_is_made(tmp_path, flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(tmp_path / "run", "--trainer.max_epochs=1", flag)
    assert not (tmp_path / "run").exists()
