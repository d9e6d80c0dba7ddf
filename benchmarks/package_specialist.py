"""Add a trained run to the bundled default model as its specialist for one image type (fp16 weights + card section).

    .venv/bin/python benchmarks/package_specialist.py --image-type brightfield --final runs/final-tb1 \
        --evaluation runs/eval-routed-scorer/metrics.json --evaluation-tta runs/eval-routed-scorer-tta/metrics.json \
        --command "nucleiseg train ..." --note "..."

The evaluations are of the split runs of both recipes routed together (the main network with this specialist for its
type), so the card's figures are of images neither network saw. ``nucleiseg add-specialist`` does the same for a
user's own model folder (it refuses the bundled one, which this script writes).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nucleiseg.model import DEFAULT_MODEL_DIR, Model, _write_json


def figures(evaluation: dict, kind: str) -> str:
    """One table row for all images and one for the specialist's image type."""
    rows = [("all", evaluation["summary"]), (kind, evaluation["by_type"][kind])]
    return "\n".join(f"| {name} | {g['n_images']} | {g['dsb_score']:.4f} | {g['ap50']:.4f} | {g['f1_50']:.3f} |"
                     for name, g in rows)


def card_section(kind: str, run: Path, command: str, minutes: float, evaluation: dict, evaluation_tta: dict,
                 note: str) -> str:
    return f"""
## Specialist for {kind} images (`{kind}/`)

Images judged {kind} from their colour statistics (as in evaluation's per-type figures) are segmented by a second
network in the subfolder `{kind}/`, a complete model folder of its own (weights, thresholds, object scorer): the same
architecture trained with every image type given a third of the crops, so the few {kind} training images weigh
more (benchmarks/RESULTS.md, stages 32 and 34). Every other image goes to the network above.

- **Command**: `{command}` ({minutes:.1f} min on the 2-core CPU; run `{run}`)
- **Thresholds**: the bundled ones (copied with `--thresholds-from`); **object scorer**: learnt on its own training images.

Routed together, the two recipes' split runs (each trained on the same 531 images) score on the 133 validation images:

| images | n | DSB score | AP@0.5 | F1@0.5 |
|---|---|---|---|---|
{figures(evaluation, kind)}

and with `--tta`:

| images | n | DSB score | AP@0.5 | F1@0.5 |
|---|---|---|---|---|
{figures(evaluation_tta, kind)}

{note}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-type", required=True, choices=["fluorescence", "brightfield", "histology"])
    parser.add_argument("--final", type=Path, required=True, help="the run trained on all images (its model/ folder)")
    parser.add_argument("--evaluation", type=Path, required=True)
    parser.add_argument("--evaluation-tta", type=Path, required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--dest", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    kind = args.image_type
    model, specialist = Model.load(args.dest), Model.load(args.final / "model")
    model.add_specialist(kind, specialist)  # validates: same normalisation, no nesting
    evaluation, evaluation_tta = (json.loads(p.read_text()) for p in (args.evaluation, args.evaluation_tta))
    specialist.save(args.dest / kind, half=True, metrics={"validation_of_routed_recipes": evaluation["summary"],
                                                          "validation_by_type": evaluation["by_type"],
                                                          "validation_of_routed_recipes_tta": evaluation_tta["summary"],
                                                          "validation_by_type_tta": evaluation_tta["by_type"]})
    _write_json(args.dest / "config.json", model.config)
    minutes = specialist.config["training"]["wall_time_s"] / 60
    card = (args.dest / "README.md").read_text()
    card = card.split(f"\n## Specialist for {kind} images")[0].rstrip("\n") + "\n"
    (args.dest / "README.md").write_text(card + card_section(kind, args.final, args.command, minutes, evaluation,
                                                             evaluation_tta, args.note))
    Model.load(args.dest)  # the folder as written loads
    print(f"packaged {args.final} -> {args.dest / kind}")


if __name__ == "__main__":
    main()
