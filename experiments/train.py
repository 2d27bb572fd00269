"""LightningCLI entry point: `python -m experiments.train fit --config ...` (what `make train` runs).

Adds to Lightning's CLI: the evaluator as the `evaluation:` config group, a `run:` group (run directory,
logger), a last.ckpt every epoch written so that no failure or kill can cost the previous one, the
resolved config and `final_metrics.json` in the run directory, the initial-vs-final metrics table printed
at the end, resumes on which the command line's settings win and the history continues, and errors that
end in what to change (closest valid keys for a misspelt one, the flag for a failed weights download).
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import inspect
import json
import netrc
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import typing
import urllib.request
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from callbacks.evaluation import EmbeddingEvaluator, Scoreboard
from callbacks.pictures import Pictures
from datamodules.base import DatasetSizeError, EmbeddingDataModule
from datamodules.files import atomic_write
from embedding_core import faiss_build, search
from experiments.console import EpochLine, SuiteProgressBar, quiet_known_noise, show_progress_bar
from lightning_modules.base import (
    EmbeddingModule,
    build_optimizer,
    divergence_message,
    non_finite_tensors,
    parameter_groups,
    saved_checkpoint,
)

RUN_DIR_ENV = "SUITE_RUN_DIR"  # shared with the processes a DDP launch starts, so all ranks agree
WANDB_ID_FILE = "wandb_id"  # in the run directory: a resumed run continues the same W&B run


# -- run directory and checkpoints ---------------------------------------------------------------
def wandb_logged_in() -> bool:
    """True when W&B has credentials (WANDB_API_KEY or a netrc entry for its host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def default_run_dir(model: str, data: str) -> str:
    """runs/<model>-<dataset>-<start time>-<6 random hex digits>: parallel runs (sweep agents) started in
    the same second get different names."""
    return (f"runs/{model.lower()}-{data.lower().removesuffix('datamodule')}-{time.strftime('%Y%m%d-%H%M%S')}"
            f"-{secrets.token_hex(3)}")


def claim_new_dir(name: typing.Callable[[], str], attempts: int = 100) -> str:
    """Create a directory under a fresh `name()` that no other process created first (mkdir is atomic)."""
    for _ in range(attempts):
        candidate = name()
        try:
            Path(candidate).mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{attempts} default run directory names were taken (last {candidate}); pass --run.dir")


RUN_FILES = ("config.yaml", "final_metrics.json", "checkpoints/last.ckpt", "csv/metrics.csv", "wandb", WANDB_ID_FILE)


def resumes_in(run_dir: str | Path, ckpt_path: str | None) -> bool:
    """Whether --ckpt_path continues the run in `run_dir`: a file inside it, or Lightning's "last" / "best" /
    "hpc", which name this run's own checkpoints."""
    if not ckpt_path:
        return False
    if ckpt_path in ("last", "best", "hpc"):
        return True
    if "://" in ckpt_path:
        return False
    return Path(ckpt_path).resolve().is_relative_to(Path(run_dir).resolve())


def refuse_overwriting(run_dir: str | Path, ckpt_path: str | None, overwrite: bool) -> None:
    """A FileExistsError when `run_dir` holds a run (any of RUN_FILES) that this command neither resumes
    nor was told to replace: a new run would overwrite its checkpoint, config, logs and final metrics."""
    found = [name for name in RUN_FILES if Path(run_dir, name).exists()]
    if not found or overwrite or resumes_in(run_dir, ckpt_path):
        return
    last = Path(run_dir, "checkpoints", "last.ckpt")
    resume = f"resume it (--ckpt_path={last}), " if last.is_file() else ""
    raise FileExistsError(f"--run.dir {run_dir} already holds a run ({', '.join(found)}) that this run would "
                          f"overwrite: {resume}choose another --run.dir (or leave it out: a new default one), or "
                          "pass --run.overwrite=true to replace it")


def externally_launched_processes() -> int:
    """How many processes torchrun / srun started for this run (1 when Lightning launches the others)."""
    return max(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")))


def ensure_writable(run_dir: str | Path) -> None:
    """Create the run directory and its checkpoints/ and prove both take a file, before any training:
    a run that cannot keep its checkpoint must not start."""
    for folder in (Path(run_dir), Path(run_dir, "checkpoints")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OSError(f"cannot write the run's files to {folder} ({err.strerror or err}); "
                          "pass a writable --run.dir") from err


def free_space(folder: str | Path) -> str:
    """"N MiB free in <folder>" (or why that is unknown), for a failed write's message."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder}"
    except OSError as err:
        return f"free space in {folder} unknown: {err.strerror or err}"


class CheckpointRefused(ValueError):
    """A checkpoint file that is not loaded: it needs code to rebuild, or it is not a checkpoint at all."""


def read_checkpoint(path: str | Path, source: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint in the local file `path`, loaded with torch.load(weights_only=True): tensors, numbers,
    strings, containers and the allow-listed hparam dataclasses only, so a planted file cannot run code.
    Anything else is a CheckpointRefused that names `source` (the path or URL the user gave); torch's own
    text, which neither names the file nor should be followed here, is not chained."""
    source = source or str(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointRefused(f"checkpoint {source} is not a readable checkpoint ({err}); pass a file "
                                    "this suite saved (<run dir>/checkpoints/last.ckpt)") from None
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"the callable {needed.group(1)}" if needed else "objects other than tensors and plain values"
        raise CheckpointRefused(f"checkpoint {source} refused, nothing in it was run: loading it needs {what}, "
                                "and a checkpoint may hold only tensors and plain values. Resume from a "
                                "checkpoint this suite saved (<run dir>/checkpoints/last.ckpt)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, AttributeError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointRefused(f"checkpoint {source} is not a readable checkpoint ({reason}): truncated, or "
                                "not written by torch.save; pass a file this suite saved "
                                "(<run dir>/checkpoints/last.ckpt)") from None


def url_file_name(url: str) -> str:
    """The last part of a URL's path ("checkpoint.ckpt" when it has none)."""
    return Path(unquote(urlparse(url).path)).name or "checkpoint.ckpt"


def download(url: str, folder: str | Path, timeout: float = 60.0) -> tuple[Path, str]:
    """(`url` copied into a new file in `folder`, its sha256). http(s) and file URLs through urllib (no
    cache: torch.hub's download cache is keyed by the file name, so a later URL ending in the same name
    would load the earlier file); other schemes (s3://, gs://, ...) through fsspec, whose filesystem
    package must be installed."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=f"-{url_file_name(url)}")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            if urlparse(url).scheme in ("http", "https", "file"):
                source = urllib.request.urlopen(url, timeout=timeout)
            else:
                import fsspec
                source = fsspec.open(url, "rb").open()
            with source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with a same-folder atomic save. Lightning's own atomic save stages
    through fsspec's temp directory (another filesystem: the final move is a copy a kill can cut short)
    and swallows PermissionError, so a run could end green without its checkpoint.
    Loads go through `read_checkpoint` (weights_only=True, whatever the caller asks): Lightning's loader
    would read a URL with weights_only=False; the CLI downloads a URL first (`SuiteCLI._parse_ckpt_path`)."""

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            raise CheckpointRefused(f"checkpoint {path}: a URL is not loaded directly; download it and pass the "
                                    "file (the command line does this for --ckpt_path)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path}: no such file")
        return read_checkpoint(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as err:
            # a full disk reaches torch's zip writer first: "[enforce fail at inline_container.cc] ..."
            if isinstance(err, RuntimeError) and not re.search(r"inline_container|PytorchStreamWriter", str(err)):
                raise
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
            raise OSError(f"could not write checkpoint {path} ({reason}; {free_space(Path(path).parent)}); the "
                          "previous one is untouched. Free space or pass a writable --run.dir") from err
        for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)


def last_checkpoint(dirpath: str) -> ModelCheckpoint:
    """`last.ckpt`, overwritten at the end of every epoch (no monitor: never selected on the test split)."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)


class FiniteWeightsOnly(Callback):
    """Refuses to save a checkpoint whose weights hold NaN or inf (weights that blew up in an epoch's last
    step pass the loss check, which runs before backward): the run stops with the divergence message and
    the previous checkpoint stays as it was. A callback, so every save of every method is checked, on every
    rank at once (DDP ranks hold the same weights). One pass over the state dict per save."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise FloatingPointError(divergence_message(f"non-finite weights ({shown}; not saved)",
                                                        checkpoint.get("epoch", trainer.current_epoch),
                                                        checkpoint.get("global_step", trainer.global_step),
                                                        saved_checkpoint(trainer)))


# -- loggers -------------------------------------------------------------------------------------
class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer deletes it) and continues under its header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    """CSVLogger for a resumed run: the epochs logged before the interruption stay in metrics.csv and
    the resumed ones are appended (a column that appears later is added to the old rows, empty)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def logged_history(metrics_csv: str | Path, up_to_step: int) -> list[tuple[int, dict[str, float]]]:
    """The rows of a run's metrics.csv logged at steps up to `up_to_step`, as (step, {name: value}) in file
    order, each with only the values it holds; [] when the file does not exist."""
    path = Path(metrics_csv)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step", "") or -1))
            values = {name: float(value) for name, value in row.items() if name and value not in ("", None)}
            if 0 <= step <= up_to_step and values:
                rows.append((step, values))
    return rows


class ReplayHistoryOnResume(Callback):
    """Logs the run's history before its checkpoint again into a resumed offline W&B run.

    W&B cannot resume an offline run: the resumed process writes a new offline folder under the same id
    whose history starts empty, `wandb sync` of it replaces what an earlier folder uploaded, and a kill -9
    can leave the earlier folder without its last records. metrics.csv, written beside W&B and appended
    to on resume, holds every row, so the resumed run starts by logging those up to the restored step: the
    latest offline folder holds the whole run. At train start, once Lightning has restored the step."""

    def __init__(self, metrics_csv: str | Path):
        self.metrics_csv = Path(metrics_csv)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        history = logged_history(self.metrics_csv, trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for step, values in history:
                    logger.log_metrics(values, step=step)


def wandb_offline() -> bool:
    """W&B runs offline unless the user is logged in (or set WANDB_MODE); `wandb sync` uploads later.
    'dryrun' is W&B's older name for offline (Lightning's offline logger sets it in the process)."""
    return os.environ.get("WANDB_MODE", "online" if wandb_logged_in() else "offline") in ("offline", "dryrun")


def wandb_run_id(run_dir: str, resume: bool) -> str:
    """The W&B run id of this run directory: WANDB_RUN_ID where W&B's own tools set it (a sweep agent
    names its trial's run so), else the stored one on resume, else a new one; stored by rank 0."""
    stored = Path(run_dir, WANDB_ID_FILE)
    if os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]
    elif resume and stored.is_file() and stored.read_text().strip():
        return stored.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        stored.write_text(run_id + "\n")
    return run_id


def default_precision(accelerator: str | None, cuda: bool | None = None, bf16: bool | None = None) -> str:
    """`trainer.precision: null`: bf16 autocast (every loss runs in fp32, `losses.fp32`) on a CUDA GPU that
    has bf16, else fp32 (CPU bf16 autocast is slower than fp32 on most CPUs without AMX)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and cuda)
    bf16 = (cuda and torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    return "bf16-mixed" if on_gpu and cuda and bf16 else "32-true"


LOGGERS = ("wandb", "csv", "none")


def check_before_the_run(logger: str, model, datamodule) -> None:
    """Settings that would fail only once training starts, checked before the run directory is made: the
    logger, the batch sizes (the DataLoader's rule), and the optimizer settings (built once here, so torch's
    own checks of lr, momentum, weight decay and betas run now)."""
    if logger not in LOGGERS:
        build_logger(logger, "", "", "")  # its error
    for name in ("batch_size", "eval_batch_size", "labeled_batch_size"):
        value = getattr(datamodule, name, None)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"--data.{name} {value}: use a positive number of images")
    if isinstance(model, EmbeddingModule):
        try:
            build_optimizer(parameter_groups(model, model.optim), model.optim)
        except ValueError as err:
            raise ValueError(f"--model.optim: {err}; set --model.optim.<key> to a valid value") from None


def csv_logger(run_dir: str, resume: bool = False) -> CSVLogger:
    """<run_dir>/csv/metrics.csv, continued on resume: the local history every run keeps (make compare's curves)."""
    return (AppendingCSVLogger if resume else CSVLogger)(save_dir=run_dir, name="csv", version="")


def check_data(datamodule) -> None:
    """The dataset read (`setup`: its root, files and image counts) before the run directory, the logs
    and the W&B run exist: a missing root stops here with the datamodule's message alone (what is expected
    under the root, where it is published), not after a traceback and with nothing left behind."""
    if not isinstance(datamodule, EmbeddingDataModule):
        return
    try:
        datamodule.setup()
    except (OSError, DatasetSizeError) as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None


def build_logger(kind: str, run_dir: str, project: str, name: str, resume: bool = False,
                 group: str | None = None, tags: list[str] | None = None):
    """wandb: W&B and the CSV history together (an offline W&B run has no local history to read back);
    csv: the CSV history alone; none: no logger."""
    if kind == "wandb":
        import wandb

        logger = WandbLogger(project=project, name=name, save_dir=run_dir, offline=wandb_offline(),
                             id=wandb_run_id(run_dir, resume), resume="allow", group=group, tags=tags,
                             settings=wandb.Settings(quiet=True))  # the run's own lines say where it is
        logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; W&B warns that it does nothing
        return [logger, csv_logger(run_dir, resume)]
    if kind == "csv":
        return csv_logger(run_dir, resume)
    if kind == "none":
        return False
    raise ValueError(f"--run.logger {kind!r}: use one of {', '.join(LOGGERS)} (make train: LOGGER=...)")


def run_header(run_dir: str, loggers) -> str:
    """Where the run keeps what it writes, and where its W&B run is (its offline folder and the upload
    command, or its URL)."""
    lines = [f"run directory: {run_dir} (config.yaml, checkpoints/last.ckpt, final_metrics.json"
             + (", csv/metrics.csv)" if any(isinstance(lg, CSVLogger) for lg in loggers) else ")")]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if getattr(run, "offline", False) or run.settings.mode == "offline":
                lines.append(f"W&B: offline run in {Path(run.dir).parent}; upload with `wandb sync "
                             f"{Path(run.dir).parent}`")
            else:
                lines.append(f"W&B: {run.url}")
    return "\n".join(lines)


# -- dashboards: what every run says about itself -----------------------------------------------
def git_commit() -> str:
    """The suite checkout's HEAD, '+dirty' when tracked files differ from it; '' outside a git checkout."""
    root = str(Path(__file__).resolve().parent.parent)
    try:
        def git(*args):
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True,
                                  timeout=20).stdout.strip()
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def run_metadata(cfg) -> dict[str, Any]:
    """method / dataset / protocol / variant (from run.*, else the classes), the W&B group (run.group, else
    method-dataset[-variant]: the seeds of one setting together) and tags, one `key:value` per facet plus
    run.tags, so the W&B UI filters and groups runs without manual editing."""
    method = cfg.run.method or cfg.model.class_path.rsplit(".", 2)[-2]  # lightning_modules.<method>.<Class>
    dataset = cfg.run.dataset or cfg.data.class_path.rsplit(".", 1)[-1].lower().removesuffix("datamodule")
    protocol = str((cfg.data.get("init_args") or {}).get("protocol") or "")
    facets = {"method": method, "dataset": dataset, "protocol": protocol, "variant": cfg.run.variant}
    group = cfg.run.group or "-".join(v for v in (method, dataset, cfg.run.variant) if v)
    tags = [f"{k}:{v}" for k, v in facets.items() if v] + list(cfg.run.tags or [])
    return {**facets, "group": group, "tags": tags}


# -- resume: the command line wins ---------------------------------------------------------------
def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested hyperparameters (dicts, dataclasses) as {"optim.lr": 0.03, ...}."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flat_settings(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: list(value) if isinstance(value, tuple) else value}  # YAML gives lists, code tuples


UNSET = "<unset>"  # a setting one side of a comparison does not have


def setting_changes(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every setting that differs."""
    old, new = flat_settings(saved), flat_settings(current)
    return [(k, old.get(k, UNSET), new.get(k, UNSET)) for k in sorted(old.keys() | new.keys())
            if k and old.get(k, UNSET) != new.get(k, UNSET)]


def resumed_param_groups(saved: list[dict], fresh: list[dict]) -> list[dict]:
    """The hyperparameters of each restored param group with this run's settings. The lr keeps the
    schedule's position: it is this run's initial lr times the checkpoint's lr / initial_lr (exactly the
    checkpoint's lr when the initial lr did not change, so an unchanged resume continues bit for bit)."""
    if len(saved) != len(fresh):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's "
                         f"{len(fresh)}: resume with the checkpoint's lr_mult / decay_norm_and_bias")
    groups = []
    for old, new in zip(saved, fresh):
        group = {k: v for k, v in new.items() if k != "params"}
        if "initial_lr" in old and "initial_lr" in new:
            same = old["initial_lr"] == new["initial_lr"]
            factor = old["lr"] / old["initial_lr"] if old["initial_lr"] else 1.0
            group["lr"] = old["lr"] if same else new["initial_lr"] * factor
        groups.append(group)
    return groups


# DataModule settings that decide what the metrics measure: the dataset, the split and the eval images. A
# resume that changes one would put a `final` beside an `initial` and `best` of another protocol.
DATA_SETTINGS_OF_THE_METRICS = ("class_path", "protocol", "split_seed", "test_fraction", "train_classes",
                                "image_size", "resize_size", "eval_transform", "validation_per_class",
                                "validation_seed", "train_per_class", "train_subset_seed")


def data_settings(data_cfg) -> dict[str, Any]:
    """The DataModule's settings from its resolved config (class_path + init_args), as plain values: what
    the checkpoint keeps as its datamodule hyperparameters."""
    init_args = data_cfg.get("init_args")
    return {"class_path": data_cfg.class_path,
            **(init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {}))}


def incomparable_data_changes(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """The changes among DATA_SETTINGS_OF_THE_METRICS between a checkpoint's data settings and this run's. A
    setting the checkpoint does not have (it predates the setting) is not a change."""
    return [(k, old, new) for k, old, new in setting_changes(saved, current)
            if k.split(".", 1)[0] in DATA_SETTINGS_OF_THE_METRICS and old != UNSET]


class CommandLineWinsOnResume(Callback):
    """On resume Lightning restores the optimizer's param groups (lr, momentum, weight decay) and the
    scheduler's base lrs from the checkpoint, over what the user passed. This puts the user's back after
    the restore, and prints which settings differ from the checkpoint's hyperparameters."""

    def __init__(self) -> None:
        self._fresh: list[tuple[list[dict], list[list[float]]]] = []

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        changes = [(f"model.{k}", old, new) for k, old, new in
                   setting_changes(checkpoint.get("hyper_parameters", {}), pl_module.hparams)]
        dm = trainer.datamodule
        if "datamodule_hyper_parameters" in checkpoint and dm is not None:
            changes += [(f"data.{k}", old, new) for k, old, new in
                        setting_changes(checkpoint["datamodule_hyper_parameters"], dm.hparams)]
        if changes and trainer.is_global_zero:
            print("resuming with settings that differ from the checkpoint's (this run's win):\n"
                  + "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in changes))

    def on_fit_start(self, trainer, pl_module) -> None:  # optimizers built, checkpoint not yet restored
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        self._fresh = [([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                        [list(getattr(s, "base_lrs", [])) for s in schedulers if s.optimizer is opt])
                       for opt in trainer.optimizers]

    def on_train_start(self, trainer, pl_module) -> None:  # after the optimizer / scheduler restore
        if trainer.ckpt_path is None:
            return
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        for opt, (groups, base_lrs) in zip(trainer.optimizers, self._fresh):
            for group, settings in zip(opt.param_groups, resumed_param_groups(opt.param_groups, groups)):
                group.update(settings)
            for scheduler, base in zip([s for s in schedulers if s.optimizer is opt], base_lrs):
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = list(base)
                    scheduler._last_lr = [g["lr"] for g in opt.param_groups]  # what get_last_lr() reports


# -- error messages ------------------------------------------------------------------------------
def init_keys(cls: type) -> list[str]:
    """Every key a class accepts (`--model.<key>`): its __init__ parameters, followed through **kwargs
    into the bases as jsonargparse does, with dataclass-typed parameters expanded to their fields."""
    keys: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            hints = typing.get_type_hints(klass.__init__)
        except (NameError, TypeError):  # unresolvable annotations: names, no dataclass expansion
            hints = {}
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in keys:
                continue
            keys.append(p.name)
            keys += [f"{p.name}.{k}" for k in _dataclass_keys(hints.get(p.name))]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return keys


def _dataclass_keys(hint: Any) -> list[str]:
    for t in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            return [f.name for f in dataclasses.fields(t)]
    return []


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def closest_keys(key: str, valid: list[str]) -> list[str]:
    """The valid keys nearest to `key` among its siblings (same dotted parent): `optim.lrr` -> `optim.lr`,
    not every key that shares the long `optim.` prefix."""
    parent, _, leaf = key.rpartition(".")
    siblings = {v.rpartition(".")[2]: v for v in valid if v.rpartition(".")[0] == parent}
    return [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.8)]


def misspelt_key_hint(message: str, options: list[str]) -> str | None:
    """The closest valid keys for the key a jsonargparse error rejects: a class's init key (model, data:
    'Option ... is not accepted' under its class_path), or an unrecognized top-level flag."""
    unknown = re.search(r"Option '([\w.]+)' is not accepted", message)
    if unknown:
        before = message[: unknown.start()]
        groups = re.findall(r'Parser key "([\w.]+)"', before)
        class_path = re.search(r"Problem with given class_path '([\w.]+)'", before)
        cls = _import(class_path.group(1)) if class_path else None
        if not groups or cls is None:
            return None
        key = ".".join([*groups[1:], unknown.group(1)])
        valid = init_keys(cls)
        close = closest_keys(key, valid)
        flag = f"--{groups[0]}.{key}"
        guess = (f"did you mean {' or '.join(f'--{groups[0]}.{k}' for k in close)}?" if close
                 else f"valid keys: {', '.join(valid)}")
        return f"{flag} is not a key of {cls.__name__}; {guess}"
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        hints = []
        for arg in unrecognized.group(1).split():
            flag = arg.split("=", 1)[0]
            close = closest_keys(flag, options) if flag.startswith("--") else []
            if close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
        return "; ".join(hints) or None
    return None


class SuiteArgumentParser(LightningArgumentParser):
    """Errors without the 60-line usage screen, a misspelt key's closest valid keys on the last line, and no
    prefix matching: argparse's allow_abbrev took `--trainer.max_epoch=1` for `--trainer.max_epochs=1`
    without a word (and a misspelling that happens to be a prefix for another key)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        hint = misspelt_key_hint(message, [s for a in self._actions for s in a.option_strings])
        if not self.exit_on_error:
            return super().error(f"{message}\n{hint}" if hint else message, ex)
        sys.stderr.write(f"every option: python -m experiments.train fit --help\nerror: {message}\n"
                         + (f"error: {hint}\n" if hint else ""))
        self.exit(2)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


def instantiation_cause(err: BaseException) -> BaseException | None:
    """The exception a class's __init__ raised, from under jsonargparse's "does not validate against any
    of the Union subtypes" wrapper (which puts it 100+ lines above the last line)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not _raised_in_jsonargparse(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def metrics_table(initial: dict, final: dict, best: dict) -> str:
    names = sorted(set(initial) | set(final))
    width = max(len(n) for n in names) if names else 10
    lines = [f"{'metric':<{width}}  {'initial':>9}  {'final':>9}  {'best':>9}"]
    for n in names:
        cells = [f"{d[n]:9.2f}" if n in d else f"{'-':>9}" for d in (initial, final, best)]
        lines.append(f"{n:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


class SuiteCLI(LightningCLI):
    def __init__(self, **kwargs):
        super().__init__(EmbeddingModule, EmbeddingDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_callback=None, auto_configure_optimizers=False,
                         parser_class=SuiteArgumentParser, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EmbeddingEvaluator, "evaluation")
        parser.add_argument("--run.dir", type=str | None, default=None,
                            help="run directory (default runs/<method>-<dataset>-<time>)")
        parser.add_argument("--run.overwrite", type=bool, default=False,
                            help="start a new run in a --run.dir that holds one, replacing its files")
        parser.add_argument("--run.logger", type=str, default="wandb", help="wandb | csv | none")
        parser.add_argument("--run.project", type=str, default="embedding-suite", help="W&B project")
        parser.add_argument("--run.name", type=str | None, default=None, help="W&B run name")
        parser.add_argument("--run.method", type=str, default="", help="METHOD name, for comparison tables")
        parser.add_argument("--run.dataset", type=str, default="", help="DATASET name, for comparison tables")
        parser.add_argument("--run.variant", type=str, default="", help="protocol variant, e.g. resnet18")
        parser.add_argument("--run.group", type=str, default="", help="W&B group (default method-dataset-variant)")
        parser.add_argument("--run.tags", type=list[str], default=[], help="extra W&B tags")
        # on by default; SUITE_PICTURES=false changes the default (the test suite's conftest: seconds per run)
        parser.add_argument("--run.pictures", type=bool, default=os.environ.get("SUITE_PICTURES", "true") != "false",
                            help="draw callbacks.pictures.Pictures at the end of training (unless one is configured)")

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI parses a checkpoint's hyperparameters over the command line before building the
        model, so a resume with a lower lr ran with the old one. Here the command line wins; the settings
        that differ are printed when the checkpoint loads (CommandLineWinsOnResume). Refused now, before the
        run directory is made: a file that is not there, one that a weights_only load refuses (a URL is
        downloaded first, without torch.hub's name-keyed cache, and checked the same way), one without
        Lightning's training state, and a resume that changes DATA_SETTINGS_OF_THE_METRICS."""
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        local = ckpt_path
        if "://" in ckpt_path:
            try:
                local, sha256 = download(ckpt_path, tempfile.gettempdir())
            except (OSError, ValueError, ImportError) as err:
                self.parser.error(f"--ckpt_path {ckpt_path}: could not download it ({err})")
            self._downloaded = {"url": ckpt_path, "file": local, "sha256": sha256}
        elif not Path(ckpt_path).is_file():
            self.parser.error(f"--ckpt_path {ckpt_path}: no such file (a run's is <run dir>/checkpoints/last.ckpt)")
        try:
            checkpoint = read_checkpoint(local, source=ckpt_path)
            if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
                raise CheckpointRefused(f"checkpoint {ckpt_path} holds no Lightning training state (state_dict, "
                                        "pytorch-lightning_version); resume from <run dir>/checkpoints/last.ckpt")
        except CheckpointRefused as err:
            if "://" in ckpt_path:
                Path(local).unlink(missing_ok=True)
            self.parser.error(f"--ckpt_path: {err}")
        saved = checkpoint.get("datamodule_hyper_parameters")
        if not saved and rank_zero_only.rank == 0:
            warnings.warn(f"--ckpt_path {ckpt_path} holds no DataModule settings (saved before they were): a change "
                          "of dataset, protocol, split or image size on this resume cannot be detected", stacklevel=1)
        # only a resumed fit mixes protocols; validate / test of a checkpoint on other data is an evaluation
        changes = incomparable_data_changes(saved, data_settings(self.config[self.config.subcommand].data)) \
            if saved and self.config.subcommand == "fit" else []
        if changes:
            if "://" in ckpt_path:
                Path(local).unlink(missing_ok=True)
            self.parser.error(
                f"--ckpt_path {ckpt_path} was trained with other data settings, and its initial and best metrics "
                "were measured under them:\n" + "\n".join(f"  data.{k}: {old!r} -> {new!r}" for k, old, new in changes)
                + "\nresume with the checkpoint's values, or start a new run (another --run.dir, no --ckpt_path)")

    def _keep_download(self, run_dir: str) -> None:
        """A URL checkpoint, checked in `_parse_ckpt_path`, moves into <run dir>/downloads/ and the run
        resumes from that file (atomically: DDP ranks each place the same bytes)."""
        fetched = getattr(self, "_downloaded", None)
        if not fetched or "file" not in fetched:
            return
        dest = Path(run_dir, "downloads", url_file_name(fetched["url"]))
        with open(fetched["file"], "rb") as source:
            atomic_write(dest, lambda f: shutil.copyfileobj(source, f))
        Path(fetched.pop("file")).unlink(missing_ok=True)
        fetched["path"] = str(dest)
        self.config_init[self.subcommand]["ckpt_path"] = str(dest)
        if rank_zero_only.rank == 0:
            print(f"--ckpt_path {fetched['url']}: downloaded to {dest} (sha256 {fetched['sha256']}), resuming from it")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = instantiation_cause(err)
            if cause is None or cause is err:
                raise
            raise cause.with_traceback(cause.__traceback__) from None

    @property
    def run_dir(self) -> str:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.run.dir:
            os.environ[RUN_DIR_ENV] = cfg.run.dir
        elif RUN_DIR_ENV not in os.environ:
            if externally_launched_processes() > 1:  # each process would draw its own default name
                raise ValueError("several processes started by torchrun / srun need one run directory: pass the "
                                 "same --run.dir to every process")
            os.environ[RUN_DIR_ENV] = claim_new_dir(lambda: default_run_dir(
                cfg.model.class_path.rsplit(".", 1)[-1], cfg.data.class_path.rsplit(".", 1)[-1]))
        return os.environ[RUN_DIR_ENV]

    def instantiate_trainer(self, **kwargs):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_before_the_run(cfg.run.logger, self.model, self.datamodule)
        check_data(self.datamodule)
        run_dir = self.run_dir
        if rank_zero_only.rank == 0:  # the other ranks start after rank 0 has begun writing the run
            refuse_overwriting(run_dir, cfg.get("ckpt_path"), cfg.run.overwrite)
        if self.datamodule is not None:  # saved in the checkpoint: a resume compares them with its own
            self.datamodule.save_hyperparameters(data_settings(cfg.data), logger=False, frame=inspect.currentframe())
        ensure_writable(run_dir)
        self._keep_download(run_dir)
        name = cfg.run.name or Path(run_dir).name
        trainer_cfg = self._get(self.config_init, "trainer")
        callbacks = [*(trainer_cfg.get("callbacks") or []), last_checkpoint(f"{run_dir}/checkpoints"),
                     FiniteWeightsOnly(), CommandLineWinsOnResume(), EpochLine()]
        if cfg.run.pictures and not any(isinstance(c, Pictures) for c in callbacks):
            callbacks.append(Pictures())
        kwargs["enable_progress_bar"] = show_progress_bar(trainer_cfg.get("enable_progress_bar"))
        if kwargs["enable_progress_bar"] and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(SuiteProgressBar())
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        resume = bool(cfg.get("ckpt_path"))
        meta = run_metadata(cfg)
        logger = build_logger(cfg.run.logger, run_dir, cfg.run.project, name, resume=resume, group=meta["group"],
                              tags=meta["tags"])
        if resume and cfg.run.logger == "wandb" and wandb_offline():
            callbacks.append(ReplayHistoryOnResume(Path(run_dir, "csv", "metrics.csv")))
        if trainer_cfg.get("precision") is None:  # base.yaml's default: bf16 autocast where it is safe
            kwargs.setdefault("precision", default_precision(trainer_cfg.get("accelerator")))
            cfg.trainer.precision = kwargs["precision"]  # config.yaml and W&B record the precision used
        return super().instantiate_trainer(default_root_dir=run_dir, callbacks=callbacks, plugins=plugins,
                                           logger=logger, **kwargs)

    @rank_zero_only
    def before_fit(self) -> None:
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        config = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        fetched = getattr(self, "_downloaded", None)
        if fetched:  # the URL stays ckpt_path (what was asked); the file it resumed from and its hash are named
            config = (f"# ckpt_path {fetched['url']} was downloaded to {fetched['path']} "
                      f"(sha256 {fetched['sha256']}); the run resumed from that file\n{config}")
        Path(self.run_dir, "config.yaml").write_text(config)
        print(run_header(self.run_dir, self.trainer.loggers) + "\n" + faiss_build.describe(search.load_faiss()),
              flush=True)
        for logger in self.trainer.loggers:  # the flattened resolved config and the commit, filterable in W&B
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({**flat_settings(self.config[self.subcommand].as_dict()),
                                        "git_commit": git_commit()})

    def before_validate(self) -> None:
        self.config_init[self.subcommand]["verbose"] = False  # Lightning's table: each metric once per loader

    def after_validate(self) -> None:
        """The checkpoint's metrics, printed once and written to <run dir>/eval_metrics.json."""
        scores = {k: v for e in self.trainer.callbacks if isinstance(e, Scoreboard) for k, v in e.latest.items()}
        if not self.trainer.is_global_zero:
            return
        cfg = self.config[self.subcommand]
        summary = {"checkpoint": cfg.get("ckpt_path"), "data": data_settings(cfg.data), "metrics": scores}
        Path(self.run_dir, "eval_metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        width = max((len(n) for n in scores), default=10)
        print("\n".join([f"checkpoint {cfg.get('ckpt_path') or '(random init)'} on {cfg.data.class_path}:",
                         *(f"{n:<{width}}  {v:9.2f}" for n, v in sorted(scores.items())),
                         f"written to {Path(self.run_dir, 'eval_metrics.json')}"]))

    def after_fit(self) -> None:
        # every evaluator's initial / latest / best, merged (semi runs add ClassificationEvaluator's val/error,
        # linear-eval configs callbacks.linear's val/linear_top1 / val/svm_top1)
        evaluators = [c for c in self.trainer.callbacks if isinstance(c, Scoreboard)]
        initial, final, best = ({k: v for e in evaluators for k, v in getattr(e, part).items()}
                                for part in ("initial", "latest", "best"))
        if self.trainer.is_global_zero:
            summary = {"run": {**run_metadata(self.config[self.subcommand]), "git_commit": git_commit()},
                       "initial": initial, "final": final, "best": best}
            Path(self.run_dir, "final_metrics.json").write_text(json.dumps(summary, indent=2))
            print(f"\nrun directory: {self.run_dir}\n"
                  f"{metrics_table(initial, final, best)}\n"
                  "(final = last epoch, the number to report; best = best over epochs, for comparison only)")
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(
                        {**{f"initial/{k[4:]}": v for k, v in initial.items()}, **final})
                    logger.experiment.finish()


def main(args=None) -> None:
    quiet_known_noise()
    SuiteCLI(args=args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # a process group left to interpreter exit can abort a rank there ("terminate called without an
        # active exception") after the run has finished: close it while the peers are still up
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
