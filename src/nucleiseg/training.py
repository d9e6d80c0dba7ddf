"""Training on PyTorch Lightning: Adam, cross-entropy (+Dice), accuracy / IoU / DSB score, early stopping,
ReduceLROnPlateau, cosine annealing or a constant rate, optional weight averaging over the last epochs,
checkpoints every epoch, TensorBoard, prediction previews and curves.

A run folder holds ``train_config.json``, ``checkpoints/`` (``last.ckpt`` each epoch, ``best.ckpt``),
``logs/`` (TensorBoard), ``previews/`` (input | true | predicted PNGs), ``history.csv`` + ``curves.png``,
and ``model/`` (the model folder, see :mod:`nucleiseg.model`).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .data import SegmentationDataset, find_samples, load_items, median_diameter, split
from .model import Model, build_network, make_config, read_config
from .network import DEFAULT_DECODER, STRIDE
from .postprocess import instances, remove_small
from .targets import N_RAYS, foreground, loss as target_loss, probabilities
from .weights import load_encoder_weights

log = logging.getLogger(__name__)
# Lightning gives its logger a handler and level of its own: its messages printed twice under the CLI's
# logging, and --quiet did not silence them. They go through the application's logging setup instead.
for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).handlers.clear()
    logging.getLogger(_name).setLevel(logging.NOTSET)
SCHEDULES = ("plateau", "cosine", "constant")
DEFAULT_DESIGN = "flow"  # the bundled model's design, measured best of the instance designs (benchmarks/RESULTS.md)


@dataclass
class TrainConfig:
    """Every training setting; saved in the run folder and the model config."""

    data: str
    out: str = "runs/nucleiseg"
    design: str | None = None  # None: the --init-model's design, else DEFAULT_DESIGN
    labels: str | None = None
    epochs: int = 40
    batch_size: int = 8
    crop: int = 256
    augment: str = "basic"  # 'strong': also wider scale, any rotation, blur, noise, channel gains (data.augmentation)
    scale_range: list | None = None  # [low, high]: random scale range of the augmentation (None: the strength's)
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0  # the pretrained encoder learns at lr x this (transfer learning: < 1 keeps more of ImageNet)
    schedule: str = "plateau"  # 'plateau': halve lr when validation loss stalls; 'cosine': anneal to lr/100; 'constant'
    average_last: int = 0  # > 0: the model saved is the mean of the weights after each of the last N epochs (SWA)
    weight_decay: float = 0.0  # > 0: decoupled weight decay (AdamW) on convolution weights; biases and norms exempt
    val_fraction: float = 0.2
    seed: int = 0
    split_seed: int | None = None  # seed of the train/validation split (None: ``seed``), so runs can differ in seed alone
    encoder_weights: str | None = "imagenet"
    freeze_encoder: bool = False
    encoder_bn: str = "frozen"  # 'frozen': fixed encoder BatchNorm statistics; 'train': batch statistics
    precision: str = "auto"  # 'auto': bf16-mixed where the hardware has bf16 units, else 32 (see resolve_precision)
    patience: int = 10  # early stopping: validations without improvement
    val_every: int = 1  # validate every this many epochs (each validation segments every validation image)
    boundary_weight: float = 3.0
    dice_weight: float = 0.0
    contact_weight: float = 0.0  # distance designs: extra loss weight where touching nuclei meet
    small_weight: float = 0.0  # distance designs: extra loss weight on small nuclei and a ring around them
    min_label_size: int = 0  # > 0: training nuclei below this many pixels become background: post-processing's min_size drops them anyway
    distance_weight: float = 1.0  # distance designs: weight of the distance map's loss against the class loss
    flow_weight: float = 1.0  # flow design: weight of the centre flows' squared error
    ray_weight: float = 1.0  # star design: weight of the ray lengths' absolute error
    contact_pos_weight: float = 20.0  # contact design: weight of contact pixels in its contact channel's loss (measured: 1 leaves it inert)
    init_model: str | None = None  # start from this model folder ('default': the bundled one), not ImageNet
    crops_per_image: int = 1
    type_balance: float = 0.0  # > 0: more crops of rare image types (see crops_per_item)
    num_workers: int = 0
    max_images: int | None = None
    previews: int = 4
    thresholds_from: str | None = None
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    progress: bool = True
    decoder_channels: list | None = None  # None: as the init model, else DEFAULT_DECODER
    # grey images to the network as (x^g1, x^g2, x^g3) (transforms.normalize), e.g. [1, 0.5, 0.25] so dim nuclei are
    # seen brightened too; None: as the --init-model has, else grey repeated to 3 channels
    grey_gammas: list | None = None
    # 'auto': images with a bright background (brightfield, stained tissue) inverted to bright nuclei on dark, as
    # fluorescence (transforms.intensity_scale); None: as the --init-model has, else not inverted
    invert: str | None = None
    # > 0: a full-resolution skip of this many channels into the last decoder block; None: as the
    # --init-model has (fine-tuning keeps its architecture), 0 when training from ImageNet
    full_res_channels: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.average_last <= self.epochs:
            raise ValueError(f"average_last must be between 0 and the number of epochs ({self.epochs}), not {self.average_last}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def bf16_hardware(accelerator: str = "cpu") -> bool:
    """True where bf16 arithmetic runs natively: a CUDA GPU that supports it, or a CPU with AMX or AVX512-BF16."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_precision(precision: str, accelerator: str = "cpu") -> str:
    """The Lightning precision to train with: 'auto' becomes 'bf16-mixed' where :func:`bf16_hardware` (2.3x
    faster than fp32 on an AMX CPU), else '32': without bf16 units a CPU emulates it, ~10x slower than fp32."""
    fast = bf16_hardware(accelerator)
    if precision == "auto":
        return "bf16-mixed" if fast else "32"
    if precision.startswith("bf16") and not fast:
        log.warning("precision %s on hardware without bf16 units: emulated, many times slower than --precision 32",
                    precision)
    return precision


def _this_rank_share(n: int) -> range:
    """Positions 0..n-1 this process handles: every world-size-th one from its rank (all without DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return range(torch.distributed.get_rank(), n, torch.distributed.get_world_size())
    return range(n)


def crops_per_item(items, crops_per_image: int, type_balance: float = 0.0,
                   normalization: dict | None = None, types: dict[str, str] | None = None) -> np.ndarray:
    """Random crops of each training image per epoch: ``crops_per_image`` each, or with ``type_balance``
    > 0 proportional to (frequency of the image's type) ** -type_balance, scaled to average
    ``crops_per_image`` before rounding (at least 1 each), so rare image types (brightfield, histology
    among mostly fluorescence) are seen more often. ``normalization``: the settings the items were
    normalised with (see ``transforms.image_type``); ``types``: the items' types by name, where known
    (``data.load_items``; needed for images that normalisation inverted)."""
    counts = np.full(len(items), crops_per_image)
    if type_balance > 0 and items:
        from collections import Counter

        from .transforms import image_type

        kinds = [types[name] if types else image_type(image, normalization) for name, image, _ in items]
        freq = Counter(kinds)
        weight = np.array([freq[t] ** -type_balance for t in kinds])
        counts = np.maximum(1, np.round(weight / weight.mean() * crops_per_image)).astype(int)
    return counts


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles per (seed, epoch) and yields (epoch, index, draw) keys, so a resumed run sees the same
    crops. Under DDP each rank takes every world-size-th key: together the ranks' batches of a step
    are exactly the batch a single process of the same total batch size would draw.
    ``counts``: crops of each image per epoch (an int: the same for all)."""

    def __init__(self, n: int, seed: int, counts: int | np.ndarray = 1):
        counts = np.broadcast_to(np.asarray(counts), (n,))
        # draw r of every image with more than r crops, for r = 0, 1, ...: uniform counts tile 0..n-1
        self.draws = np.concatenate([np.nonzero(counts > r)[0] for r in range(int(counts.max(initial=0)))] or [[]])
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(_this_rank_share(len(self.draws)))

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.draws))
        return iter([(self.epoch, int(self.draws[order[k]]), int(order[k])) for k in _this_rank_share(len(order))])


class ShardSampler(torch.utils.data.Sampler):
    """Validation images split over DDP ranks (all of them in a single process)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return len(_this_rank_share(self.n))

    def __iter__(self):
        return iter(_this_rank_share(self.n))


class TrainDataset(SegmentationDataset):
    """Augmented random crops whose randomness depends only on (seed, epoch, draw)."""

    def __init__(self, items, design: str, crop: int, seed: int, augment: str = "basic", scale_range=None,
                 channel_shuffle: bool = True):
        super().__init__(items, design, crop=crop, augment=augment, scale_range=scale_range, channel_shuffle=channel_shuffle)
        self.seed = seed

    def __getitem__(self, key):
        epoch, index, draw = key
        self.transform.set_random_seed(int(np.random.default_rng([self.seed, epoch, draw]).integers(2**31)))
        return super().__getitem__(index)


class ValDataset(SegmentationDataset):
    """Whole validation images with their targets and instance labels."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        return image, target, torch.from_numpy(self.items[index][2])


def _pad(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def add_outputs(state: dict[str, torch.Tensor], n: int, logit: float) -> dict[str, torch.Tensor]:
    """A model's weights with ``n`` outputs added to its head (a distance model's contact channel, a flow
    model's rays), so a richer design can start from it: the old outputs are unchanged, the new ones start
    at the constant logit ``logit`` everywhere."""
    state = dict(state)
    weight, bias = state["head.weight"], state["head.bias"]
    state["head.weight"] = torch.cat([weight, torch.zeros_like(weight[:1]).repeat(n, 1, 1, 1)])
    state["head.bias"] = torch.cat([bias, torch.full_like(bias[:1], logit).repeat(n)])
    return state


# fine-tuning into a design with more outputs: (source design, design) -> (outputs added, their starting logit)
WIDENINGS = {("distance", "contact"): (1, float(np.log(0.05 / 0.95))),  # contact probability 0.05
             ("flow", "star"): (N_RAYS, float(np.log(np.expm1(0.5))))}  # rays of 0.5 x RAY_SCALE = 8 px


def grow_decoder(net: torch.nn.Module, state: dict[str, torch.Tensor], source_full_res: int) -> list[str]:
    """Fill ``state`` (a trained model's weights) for ``net``, whose decoder may be wider or have a
    full-resolution skip the trained one lacks, in place. Old weights keep their places (a decoder
    block reads [upsampled, skip] channels, so the skip part moves when the upsampled part widens);
    new channels keep ``net``'s fresh initialisation and are read through zero weights, so the outputs
    start unchanged (like Net2Net's function-preserving widening). Returns what grew."""
    channels = net.full_res[0].out_channels if net.full_res is not None else 0
    if source_full_res > channels:
        raise ValueError(f"the initial model has a full-resolution skip of {source_full_res} channels, this run "
                         f"{channels} (--full-res-channels)")
    ours = net.state_dict()
    grown = [f"a new full-resolution skip of {channels} channels"] if channels > source_full_res else []
    widths = {k: v.shape[0] for k, v in state.items() if k.endswith(".up.bias")}  # before any grows
    state.update({k: v for k, v in ours.items() if k not in state})  # the new skip convolution
    for key, fresh in ours.items():
        old = state[key]
        if old.shape == fresh.shape:
            continue
        if any(o > n for o, n in zip(old.shape, fresh.shape)):
            raise ValueError(f"{key}: the initial model's decoder is wider ({tuple(old.shape)}) than this run's "
                             f"({tuple(fresh.shape)}); --decoder-channels can only grow")
        new = fresh.clone()
        if old.ndim <= 1:  # biases, BatchNorm parameters and statistics
            new[:old.shape[0]] = old
        else:
            out_axis, in_axis = (1, 0) if key.endswith(".up.weight") else (0, 1)  # ConvTranspose2d: (in, out, kh, kw)
            rows = new.narrow(out_axis, 0, old.shape[out_axis])
            rows.zero_()  # old outputs read new inputs through zero weights
            block = key.split(".")
            if block[0] == "decoder" and block[2:4] == ["conv", "0"]:
                # [upsampled, skip]: the upsampled part is this block's width, the skip part follows it
                width_old, width_new = widths[f"decoder.{block[1]}.up.bias"], fresh.shape[0]
                parts = [(0, 0, width_old), (width_old, width_new, old.shape[in_axis] - width_old)]
            else:
                parts = [(0, 0, old.shape[in_axis])]
            for src, dst, n in parts:
                rows.narrow(in_axis, dst, n).copy_(old.narrow(in_axis, src, n))
        state[key] = new
        if key.startswith("decoder.") and key.endswith(".up.weight") and old.shape[1] != fresh.shape[1]:
            grown.append(f"decoder block {key.split('.')[1]} widened {old.shape[1]} -> {fresh.shape[1]}")
    return grown


class SegmentationModule(L.LightningModule):
    """The network, its loss and metrics; Adam + ReduceLROnPlateau or cosine annealing."""

    def __init__(self, model_config: dict, train_config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.model_config, self.cfg = model_config, TrainConfig.from_dict(train_config)
        self.design = model_config["design"]
        self.net = build_network(model_config)
        self.net.freeze_encoder(self.cfg.freeze_encoder)
        self.net.freeze_encoder_bn(self.cfg.encoder_bn == "frozen")

    def on_fit_start(self) -> None:
        self.net.to(memory_format=torch.channels_last)  # faster convolutions on CPU (and with bf16)

    def init_weights(self) -> str:
        """Initialise from a trained model folder (fine-tuning) or the encoder from ImageNet weights."""
        if self.cfg.init_model:
            source = Model.load(self.cfg.init_model)
            ours = json.loads(json.dumps(self.model_config))
            widen = WIDENINGS.get((source.design, self.design))
            body = lambda arch: {k: v for k, v in arch.items()  # noqa: E731
                                 if k not in ("out_channels", "full_res_channels", "decoder_channels")}
            if ((source.design != self.design and not widen) or source.config["normalization"] != ours["normalization"]
                    or body(source.config["architecture"]) != body(ours["architecture"])):
                raise ValueError(f"{self.cfg.init_model}: its design, architecture or normalisation differ from this "
                                 f"run's ({source.design} vs {self.design}); fine-tune with the same --design and decoder "
                                 "(or a distance model into --design contact, a flow model into --design star)")
            state = source.net.state_dict()
            if widen:
                state = add_outputs(state, *widen)
            grown = grow_decoder(self.net, state, source.config["architecture"].get("full_res_channels", 0))
            self.net.load_state_dict(state)
            return (f"model {self.cfg.init_model}" + (f" (+ {widen[0]} new output{'s' * (widen[0] > 1)})" if widen else "")
                    + "".join(f" (+ {g})" for g in grown))
        return "encoder " + load_encoder_weights(self.net.encoder, self.cfg.encoder_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def _pixel_stats(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        pred = foreground(probabilities(logits.float(), self.design)) > 0.5
        true = target[:, 0] > 0
        inter = (pred & true).sum().float()
        union = (pred | true).sum().float()
        return {"acc": (pred == true).float().mean(), "iou": inter / union.clamp(min=1)}

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return target_loss(logits, target, self.design, c.boundary_weight, c.dice_weight, c.contact_weight,
                           c.contact_pos_weight, c.small_weight, c.distance_weight, c.flow_weight,
                           c.ray_weight)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        stats = self._pixel_stats(logits.detach(), y)
        bs = x.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train_acc", stats["acc"], on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log("train_iou", stats["iou"], on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, labels = batch
        h, w = x.shape[-2:]
        logits = self(_pad(x))[..., :h, :w]
        loss = self._loss(logits, y)
        stats = self._pixel_stats(logits, y)
        maps = probabilities(logits.float(), self.design)[0].cpu().numpy()
        from .metrics import dsb_score

        score = dsb_score(labels[0].numpy(), instances(maps, self.design))
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=1, sync_dist=True)
        self.log("val_acc", stats["acc"], on_epoch=True, batch_size=1, sync_dist=True)
        self.log("val_iou", stats["iou"], on_epoch=True, prog_bar=True, batch_size=1, sync_dist=True)
        self.log("val_dsb", torch.tensor(score, dtype=torch.float32), on_epoch=True, prog_bar=True, batch_size=1, sync_dist=True)

    def configure_optimizers(self):
        encoder = [p for p in self.net.encoder.parameters() if p.requires_grad]
        others = [p for n, p in self.net.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
        # one group unless the encoder's rate differs (so checkpoints of earlier runs resume as they were saved)
        groups = [{"params": others + encoder, "lr": self.cfg.lr}]
        if encoder and self.cfg.encoder_lr_scale != 1.0:
            groups = [{"params": others, "lr": self.cfg.lr}, {"params": encoder, "lr": self.cfg.lr * self.cfg.encoder_lr_scale}]
        if self.cfg.weight_decay > 0:  # AdamW (Loshchilov & Hutter 2019): shrink weights apart from the gradient step
            groups = [{**g, "params": ps, "weight_decay": self.cfg.weight_decay if decay else 0.0}
                      for g in groups for decay in (True, False)
                      if (ps := [p for p in g["params"] if (p.ndim > 1) == decay])]
            opt = torch.optim.AdamW(groups, lr=self.cfg.lr)
        else:  # as every run before --weight-decay was trained (and their checkpoints resume)
            opt = torch.optim.Adam(groups, lr=self.cfg.lr)
        if self.cfg.schedule == "cosine":  # settles the weights at the end instead of leaving them noisy
            if len(groups) == 1:  # as runs before --encoder-lr-scale were trained (and their checkpoints resume)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.cfg.epochs, eta_min=self.cfg.lr / 100)
            else:  # each parameter group from its own rate to 1/100 of it
                anneal = lambda epoch: 0.01 + 0.99 * (1 + math.cos(math.pi * min(epoch, self.cfg.epochs) / self.cfg.epochs)) / 2  # noqa: E731
                sched = torch.optim.lr_scheduler.LambdaLR(opt, anneal)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if self.cfg.schedule == "constant":  # for weight averaging: the averaged weights explore, the mean settles
            return opt
        monitor = "val_loss" if self.cfg.val_fraction > 0 else "train_loss"
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=max(2, self.cfg.patience // 3))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": monitor}}


class PreviewCallback(L.Callback):
    """After each epoch, save input | true | predicted for a few validation images (training images when
    there is no validation split), as PNG and in TensorBoard."""

    def __init__(self, items, folder: Path):
        self.items, self.folder = items, folder

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or not self.items or trainer.sanity_checking:
            return
        from .figures import prediction_grid

        was_training = pl_module.net.training  # read before Model(), which switches the net to eval mode
        model = Model(pl_module.net, pl_module.model_config)
        rows = []
        for name, image, labels in self.items:
            maps = model.maps_from_normalized(image)
            rows.append((name, image, labels, instances(maps, pl_module.design)))
        pl_module.net.train(was_training)
        path = self.folder / f"epoch_{trainer.current_epoch:03d}.png"
        array = prediction_grid(rows, path, title=f"epoch {trainer.current_epoch}")
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("previews", array, trainer.current_epoch, dataformats="HWC")


class WeightAveraging(L.Callback):
    """Running mean of the network's weights (and BatchNorm statistics) after each of the last ``n``
    epochs: stochastic weight averaging (Izmailov et al. 2018), a flatter optimum than any single epoch's.
    The mean travels in the checkpoints, so a resumed run keeps it."""

    def __init__(self, n: int, epochs: int):
        self.first, self.count, self.mean = epochs - n, 0, None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch < self.first or trainer.sanity_checking:
            return
        state = {k: v.detach().float().clone() for k, v in pl_module.net.state_dict().items() if v.is_floating_point()}
        self.count += 1
        if self.mean is None:
            self.mean = state
        else:
            for k, v in state.items():
                self.mean[k] += (v - self.mean[k]) / self.count

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean = state["count"], state["mean"]


class HistoryCallback(L.Callback):
    """Per-epoch metrics to ``history.csv`` and a loss / accuracy / IoU / DSB plot ``curves.png``.

    ``elapsed_s`` is the training time up to each epoch's end, summed over resumed runs.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.rows: list[dict] = []
        self.started, self.earlier_s = time.time(), 0.0
        self.validated = -1  # the last epoch that ran validation
        path = run_dir / "history.csv"
        if path.exists():  # resumed run: keep earlier epochs
            with open(path) as fh:
                self.rows = [{k: int(float(v)) if k == "epoch" else float(v) for k, v in r.items() if v != ""}
                             for r in csv.DictReader(fh)]

    def elapsed(self) -> float:
        """Seconds of training so far: the epochs kept from before a resume plus this process's."""
        return self.earlier_s + time.time() - self.started

    def on_train_start(self, trainer, pl_module):
        kept = [r for r in self.rows if r["epoch"] < trainer.current_epoch]  # epochs finished before a resume
        self.started, self.earlier_s = time.time(), (kept[-1].get("elapsed_s", 0.0) if kept else 0.0)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        # validation (when it runs this epoch) ends before this hook; otherwise its metrics are an earlier epoch's
        kinds = ("train_", "val_") if self.validated == trainer.current_epoch else ("train_",)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(kinds)}
        row = {"epoch": trainer.current_epoch, "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "time": time.time(), "elapsed_s": self.elapsed(), **metrics}
        self.rows = [r for r in self.rows if r["epoch"] < trainer.current_epoch] + [row]
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "epoch", k))
        with open(self.run_dir / "history.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        from .figures import training_curves

        training_curves(self.rows, self.run_dir / "curves.png")


def _loaders(cfg: TrainConfig, train_items, val_items, design: str, normalization: dict, types: dict[str, str]):
    # grey images given as gamma channels keep their channel order (shuffling them would mismatch prediction)
    train_ds = TrainDataset(train_items, design, cfg.crop, cfg.seed, cfg.augment, cfg.scale_range,
                            channel_shuffle=not cfg.grey_gammas)
    counts = crops_per_item(train_items, cfg.crops_per_image, cfg.type_balance, normalization, types)
    sampler = EpochSampler(len(train_ds), cfg.seed, counts)
    train = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    val = None
    if val_items:
        val = torch.utils.data.DataLoader(ValDataset(val_items, design, crop=None), batch_size=1,
                                          sampler=ShardSampler(len(val_items)), num_workers=0)
    return train, val


def train(cfg: TrainConfig, resume: bool = False, epochs: int | None = None, val_every: int | None = None) -> Path:
    """Train a model and write the run folder; returns the path of the saved model folder.

    With ``resume``, ``cfg.out`` must be an earlier run: its settings and ``last.ckpt`` are used and
    training continues to the planned number of epochs, or to ``epochs`` (to extend a finished run),
    validating every ``val_every`` epochs from now on if given (it does not change what is learnt).
    """
    run_dir = Path(cfg.out)
    if resume:
        saved = json.loads((run_dir / "train_config.json").read_text())
        if saved.get("schedule") == "cosine" and epochs and epochs != saved["epochs"]:
            # its scheduler (restored from the checkpoint) has annealed over the planned epochs; past
            # them the cosine would climb back to the full learning rate
            raise ValueError(f"{run_dir}: a cosine-schedule run cannot be extended to {epochs} epochs; "
                             f"fine-tune its model instead (--init-model {run_dir / 'model'})")
        cfg = TrainConfig.from_dict({**saved, "progress": cfg.progress, "epochs": epochs or saved["epochs"],
                                     "val_every": val_every or saved.get("val_every", 1)})
    elif (run_dir / "checkpoints" / "last.ckpt").exists():
        raise FileExistsError(f"{run_dir}: holds an earlier run; use --resume to continue it or choose another --out")
    if cfg.val_every < 1 or (cfg.val_every > 1 and cfg.schedule == "plateau"):
        raise ValueError(f"val_every {cfg.val_every}: must be 1 with the plateau schedule (it steps on each epoch's "
                         "validation loss), else a positive number of epochs")
    # architecture defaults: as the model fine-tuned from, else the plain recipe
    init_config = read_config(cfg.init_model) if cfg.init_model else {}
    arch = init_config.get("architecture", {})
    if cfg.design is None:
        cfg = replace(cfg, design=init_config.get("design", DEFAULT_DESIGN))
    if cfg.full_res_channels is None:
        cfg = replace(cfg, full_res_channels=arch.get("full_res_channels", 0))
    if cfg.decoder_channels is None:
        cfg = replace(cfg, decoder_channels=list(arch.get("decoder_channels", DEFAULT_DECODER)))
    if cfg.grey_gammas is None and init_config.get("normalization", {}).get("grey_gammas"):
        cfg = replace(cfg, grey_gammas=list(init_config["normalization"]["grey_gammas"]))
    if cfg.invert is None:
        cfg = replace(cfg, invert=init_config.get("normalization", {}).get("invert") or None)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    problems: list[str] = []
    layout, samples = find_samples(cfg.data, cfg.labels, problems=problems)
    if cfg.max_images:
        samples = samples[:cfg.max_images]
    names = [s.name for s in samples]
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_names, val_names = split(names, cfg.val_fraction, split_seed) if cfg.val_fraction > 0 else (sorted(names), [])
    normalization = {"grey_gammas": [float(g) for g in cfg.grey_gammas]} if cfg.grey_gammas else {}
    if cfg.invert:
        normalization["invert"] = cfg.invert
    model_config = make_config(cfg.design, tuple(cfg.decoder_channels), normalization, full_res_channels=cfg.full_res_channels, data={
        "root": str(cfg.data), "layout": layout, "labels": cfg.labels, "n_images": len(names),
        "val_fraction": cfg.val_fraction, "seed": split_seed, "train": train_names, "val": val_names})
    model_config["training"] = {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}
    model_config["training"]["train_crop"] = cfg.crop
    precision = model_config["training"]["precision"] = resolve_precision(cfg.precision, cfg.accelerator)
    log.info("training precision: %s", precision)
    types: dict[str, str] = {}
    items = {it[0]: it for it in load_items(samples, model_config["normalization"], cfg.progress, problems, types)}
    model_config["data"]["skipped"] = problems  # one line per unusable file; training goes on without them
    train_items = [items[n] for n in train_names if n in items]
    if cfg.min_label_size > 0:
        train_items = [(n, image, remove_small(labels, cfg.min_label_size)) for n, image, labels in train_items]
    val_items = [items[n] for n in val_names if n in items]
    model_config["nucleus_diameter"] = round(median_diameter([it[2] for it in train_items]), 2)

    module = SegmentationModule(model_config, asdict(cfg))
    if not resume:
        log.info("initialised from %s", module.init_weights())
    train_loader, val_loader = _loaders(cfg, train_items, val_items, cfg.design, model_config["normalization"], types)

    monitor, mode = ("val_dsb", "max") if val_items else ("train_loss", "min")
    ckpt_dir = run_dir / "checkpoints"
    preview_items = sorted(val_items or train_items, key=lambda it: it[1].shape[0] * it[1].shape[1])[:cfg.previews]
    history = HistoryCallback(run_dir)
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(ckpt_dir, filename="best", monitor=monitor, mode=mode,
                                            save_top_k=1, enable_version_counter=False),
        # last.ckpt at the end of every training epoch (after validation): a killed run resumes there
        L.pytorch.callbacks.ModelCheckpoint(ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                                            save_on_train_epoch_end=True, enable_version_counter=False),
        L.pytorch.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience),
        L.pytorch.callbacks.LearningRateMonitor(logging_interval="epoch"),
        history,
        PreviewCallback(preview_items, run_dir / "previews"),
    ]
    averaging = WeightAveraging(cfg.average_last, cfg.epochs) if cfg.average_last else None
    if averaging:
        callbacks.append(averaging)
    (run_dir / "previews").mkdir(exist_ok=True)
    logger = L.pytorch.loggers.TensorBoardLogger(str(run_dir), name="logs", version="")
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
                        num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=precision,
                        callbacks=callbacks, logger=logger, enable_progress_bar=cfg.progress,
                        num_sanity_val_steps=0, log_every_n_steps=10, deterministic=False,
                        check_val_every_n_epoch=cfg.val_every,
                        use_distributed_sampler=False,  # our samplers shard by rank themselves
                        enable_model_summary=cfg.progress)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resume and last.exists() else None)
    if not trainer.is_global_zero:
        return run_dir / "model"
    best = ckpt_dir / "best.ckpt"
    # the best epoch by validation; with a cosine schedule the last, annealed one (the point of annealing);
    # with a constant rate the last, replaced by the mean of the last epochs when they were averaged
    chosen = best if best.exists() and cfg.schedule == "plateau" else last
    state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
    module.net.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
    if averaging and averaging.mean is not None:
        module.net.load_state_dict(averaging.mean, strict=False)  # integer buffers (BatchNorm counters) stay
        model_config["training"]["epochs_averaged"] = averaging.count
    model_config["training"]["epochs_run"] = trainer.current_epoch
    model_config["training"]["wall_time_s"] = round(history.elapsed(), 1)  # summed over resumes
    model = Model(module.net, model_config)
    metrics = {"nucleiseg_version": __version__}
    if cfg.thresholds_from:
        model.thresholds.update(json.loads((Path(cfg.thresholds_from) / "thresholds.json").read_text()))
    if val_items:
        from .evaluate import evaluate_items, tune_thresholds

        maps = [model.maps_from_normalized(image) for _, image, _ in val_items]
        model.thresholds.update(tune_thresholds(maps, [it[2] for it in val_items], model.design))
        if model.thresholds.pop("tta", None) is not None:  # tuned for the maps of the network they came from
            log.info("thresholds for --tta from %s not kept: tune them for this model with `nucleiseg tune --tta`",
                     cfg.thresholds_from)
        metrics["validation"] = evaluate_items(model, val_items, maps=maps, types=types)["summary"]
    model_dir = model.save(run_dir / "model", metrics=metrics)
    return model_dir
