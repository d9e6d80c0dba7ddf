"""The trained model as a self-describing folder, and the user-facing :class:`Model` API.

A model folder holds ``config.json`` (architecture, target design, normalisation, tiling, training
settings, data split, package version), ``weights.safetensors``, ``thresholds.json`` (post-processing
thresholds tuned on validation data; under its key ``tta``, those tuned on test-time augmented maps, which
are smoother and want their own), optionally ``object_scorer.safetensors`` (the second-level object scorer of
:mod:`nucleiseg.objects`, used unless the threshold ``object_scorer`` is 0) and ``object_scorer_tta.safetensors`` (one
learnt on TTA maps, used with TTA in place of the first), ``metrics.json`` and a model card ``README.md``.
A folder may also hold *specialists*: complete model folders in subfolders named after an image type
(``config['specialists']``, e.g. ``{"brightfield": "brightfield"}``), which segment the images of that type
(:func:`transforms.image_type`) in its place.
Loading validates everything before any weight is copied: a mismatch is a clear error, never a
half-loaded model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .inference import TILE_OVERLAP, TILE_SIZE, MapsNet, OnnxRunner, TorchRunner, predict_maps
from .io import read_image
from .network import DEFAULT_DECODER, STRIDE, UNet
from .objects import ObjectScorer, scorer_file
from .postprocess import DEFAULT_THRESHOLDS, instances
from .targets import DESIGNS, N_RAYS, n_channels, ray_channels, vector_channels
from .transforms import DEFAULT_NORMALIZATION, IMAGE_TYPES, image_type, intensity_scale, is_inverted, normalize

FORMAT = "nucleiseg-model"
FORMAT_VERSION = 1
ARCHITECTURE = "unet-mobilenetv2"
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
# diameter="auto": a first pass at this zoom measures the nuclei (even ones several times larger than
# the trained size come into its range there); images whose nuclei measure more than AUTO_ZOOM_ABOVE
# times the trained diameter there and in a second pass at CONFIRM_ZOOM (which sees smaller, nearly
# touching nuclei apart where the first merges them) are then zoomed to the trained size
# (benchmarks/RESULTS.md, "Automatic nucleus size": large gains on magnified images)
PROBE_ZOOM = 0.25
CONFIRM_ZOOM = 0.5
AUTO_ZOOM_ABOVE = 2.5
AUTO_MIN_NUCLEI = 5  # fewer nuclei in the first pass (small images: neighbours merge there) measure nothing
CLASS_NAMES = {"semantic": ["background", "nucleus"], "contour": ["background", "interior", "boundary"],
               "distance": ["background", "nucleus", "distance"],
               "contact": ["background", "nucleus", "distance", "contact"],
               "flow": ["background", "nucleus", "distance", "flow_y", "flow_x"],
               "star": ["background", "nucleus", "distance", "flow_y", "flow_x"] + [f"ray_{k}" for k in range(N_RAYS)]}


class ModelError(ValueError):
    """A model folder cannot be used; the message says which file and why."""


def model_folder(name: str | os.PathLike | None) -> Path:
    """The folder a model name refers to: None or 'default' is the bundled model, anything else a path."""
    return DEFAULT_MODEL_DIR if name is None or str(name) == "default" else Path(name)


def read_config(name: str | os.PathLike | None) -> dict:
    """A model folder's config.json, validated, without loading its weights."""
    path = model_folder(name) / "config.json"
    config = _read_json(path)
    validate_config(config, str(path))
    return config


def make_config(design: str, decoder_channels: tuple[int, ...] = DEFAULT_DECODER,
                normalization: dict | None = None, tile_size: int = TILE_SIZE, tile_overlap: int = TILE_OVERLAP,
                training: dict | None = None, data: dict | None = None, full_res_channels: int = 0) -> dict:
    """A complete model config; every setting needed to rebuild the network and its pre-processing.
    ``full_res_channels`` is written only when non-zero (configs without it have no full-resolution skip)."""
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "nucleiseg_version": __version__,
        "architecture": {"name": ARCHITECTURE, "encoder": "mobilenet_v2", "decoder": "transposed-conv",
                         "decoder_channels": list(decoder_channels), "out_channels": n_channels(design),
                         "stride": STRIDE, "in_channels": 3},
        "design": design, "classes": CLASS_NAMES[design],
        "normalization": {**DEFAULT_NORMALIZATION, **(normalization or {})},
        "inference": {"tile_size": tile_size, "tile_overlap": tile_overlap, "block_size": 4096},
        "training": training or {}, "data": data or {},
    }
    if full_res_channels:
        config["architecture"]["full_res_channels"] = int(full_res_channels)
    return config


def validate_config(config: dict, where: str = "config.json") -> None:
    """Refuse configs of another format, version, architecture, or inconsistent channels."""
    def fail(msg: str):
        raise ModelError(f"{where}: {msg}")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fail(f"not a nucleiseg model config (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version") != FORMAT_VERSION:
        fail(f"model format version {config.get('format_version')!r} is not supported by nucleiseg {__version__} "
             f"(expects {FORMAT_VERSION}); re-export the model or upgrade nucleiseg")
    arch = config.get("architecture", {})
    if arch.get("name") != ARCHITECTURE:
        fail(f"architecture {arch.get('name')!r} is not {ARCHITECTURE!r}")
    design = config.get("design")
    if design not in DESIGNS:
        fail(f"unknown target design {design!r}")
    if arch.get("out_channels") != n_channels(design):
        fail(f"design {design!r} needs {n_channels(design)} output channels, config says {arch.get('out_channels')}")
    if len(arch.get("decoder_channels", [])) != 5:
        fail("architecture.decoder_channels must have 5 entries")
    full_res = arch.get("full_res_channels", 0)
    if not (isinstance(full_res, int) and full_res >= 0):
        fail(f"architecture.full_res_channels must be a whole number >= 0, not {full_res!r}")
    diameter = config.get("nucleus_diameter")
    if diameter is not None and not (isinstance(diameter, (int, float)) and diameter > 0):
        fail(f"nucleus_diameter must be a positive number of pixels, not {diameter!r}")
    inference = config.get("inference", {})
    block, overlap = inference.get("block_size", 4096), inference.get("tile_overlap", TILE_OVERLAP)
    if -(-(block // 2) // STRIDE) * STRIDE + 2 * -(-overlap // STRIDE) * STRIDE > block:  # see Model.predict
        fail(f"inference.block_size {block} is too small for tile_overlap {overlap}: a block of half that size with "
             "the overlap on each side must fit in it")
    specialists = config.get("specialists", {})
    if not isinstance(specialists, dict) or not all(k in IMAGE_TYPES and isinstance(v, str) and v and "/" not in v
                                                     and "\\" not in v and v not in (".", "..")
                                                     for k, v in specialists.items()):
        fail(f"specialists must map image types ({', '.join(IMAGE_TYPES)}) to subfolder names, not {specialists!r}")


def build_network(config: dict) -> UNet:
    """An untrained network with the architecture described by ``config``."""
    arch = config["architecture"]
    return UNet(arch["out_channels"], tuple(arch["decoder_channels"]), arch.get("full_res_channels", 0))


class Model:
    """A trained nucleus segmentation model: image in, instance labels out.

    >>> model = Model.load()                      # the bundled default model
    >>> labels = model.predict(image)             # (H, W) int32, 0 = background
    """

    def __init__(self, net: UNet, config: dict, thresholds: dict | None = None, path: Path | None = None):
        validate_config(config)
        self.net = net.eval()
        self.config = config
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.path = path
        self.scorer: ObjectScorer | None = None
        self.tta_scorer: ObjectScorer | None = None  # learnt on TTA maps; with TTA, self.scorer serves when None
        self.specialists: dict[str, Model] = {}  # image type -> the model that segments images of that type
        self.backend = "torch"
        self._runner = TorchRunner(MapsNet(self.net, self.design))

    def thresholds_for(self, tta: bool = False, overrides: dict | None = None) -> dict:
        """The post-processing thresholds for maps computed with or without TTA: the plain ones, updated by
        those tuned on TTA maps (``thresholds['tta']``) when ``tta``, then by ``overrides``."""
        plain = {k: v for k, v in self.thresholds.items() if k != "tta"}
        return {**plain, **(self.thresholds.get("tta", {}) if tta else {}), **(overrides or {})}

    @property
    def design(self) -> str:
        return self.config["design"]

    def scorer_for(self, tta: bool = False) -> ObjectScorer | None:
        """The object scorer for plain or TTA maps: with ``tta`` the one learnt on TTA maps when there is one."""
        return (self.tta_scorer or self.scorer) if tta else self.scorer

    def segment(self, maps: np.ndarray, thresholds: dict, tta: bool = False) -> np.ndarray:
        """Instance labels from this model's maps (``tta``: test-time augmented ones): with its object scorer when
        it has one (and the threshold ``object_scorer`` is not 0), else the watershed of :func:`postprocess.instances`."""
        scorer = self.scorer_for(tta)
        if scorer is not None and thresholds.get("object_scorer", 1):
            return scorer.segment(maps, self.design, thresholds)
        return instances(maps, self.design, thresholds)

    # ---- folder round trip -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, backend: str = "torch", object_scorer: bool = True) -> "Model":
        """Load a model folder (None or 'default': the bundled model); ``backend`` 'torch' or 'onnx';
        ``object_scorer`` False leaves out its object scorer (e.g. to learn a new one in its place)."""
        path = model_folder(path)
        if not path.is_dir():
            raise ModelError(f"{path}: model folder not found")
        config = read_config(path)
        net = build_network(config)
        weights = path / "weights.safetensors"
        if not weights.is_file():
            raise ModelError(f"{weights}: weights file missing")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{weights}: corrupt weights file ({exc})") from None
        expected = net.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ModelError(f"{weights}: tensors do not match config.json ({len(missing)} missing e.g. {missing[:2]}, "
                             f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(wrong)} wrong shape e.g. {wrong[:2]})")
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        thresholds_file = path / "thresholds.json"
        thresholds = _read_json(thresholds_file) if thresholds_file.exists() else None
        model = cls(net, config, thresholds, path=path)
        for tta in (False, True) if object_scorer else ():
            file = path / scorer_file(tta)
            if not file.is_file():
                continue
            try:
                scorer = ObjectScorer.load(file)
            except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ModelError(f"{file}: unusable object scorer ({exc}); learn a new one with nucleiseg fit-scorer"
                                 f"{' --tta' if tta else ''}, or remove the file to use the watershed alone") from None
            setattr(model, "tta_scorer" if tta else "scorer", scorer)
        for kind, sub in config.get("specialists", {}).items():
            specialist = cls.load(path / sub, backend=backend, object_scorer=object_scorer)
            if problem := model._specialist_problem(specialist):
                raise ModelError(f"{path / sub}: {problem}")
            model.specialists[kind] = specialist
        if backend != "torch":
            model.use_backend(backend)
        return model

    def add_specialist(self, kind: str, specialist: "Model") -> None:
        """Let ``specialist`` segment the images of type ``kind`` (:data:`transforms.IMAGE_TYPES`); saved in the
        subfolder ``kind`` of this model's folder by :meth:`save`."""
        if problem := self._specialist_problem(specialist):
            raise ModelError(problem)
        config = {**self.config, "specialists": {**self.config.get("specialists", {}), kind: kind}}
        validate_config(config, "specialists")
        self.config = config
        self.specialists[kind] = specialist

    def _specialist_problem(self, specialist: "Model") -> str | None:
        """Why ``specialist`` cannot serve this model (None if it can): images reach it normalised as for this model."""
        if specialist.specialists:
            return "a specialist cannot have specialists of its own"
        if specialist.config["normalization"] != self.config["normalization"]:
            return "a specialist must normalise images as the model does (config 'normalization')"
        return None

    def save(self, path: str | os.PathLike, half: bool = False, metrics: dict | None = None) -> Path:
        """Write the model folder; ``half`` stores fp16 weights (the bundled model), loaded back as fp32."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
                 for k, v in self.net.state_dict().items()}
        from .io import atomic_path

        with atomic_path(path / "weights.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT, "dtype": "float16" if half else "float32"})
        _write_json(path / "config.json", self.config)
        _write_json(path / "thresholds.json", self.thresholds)
        for tta, scorer in ((False, self.scorer), (True, self.tta_scorer)):
            if scorer is not None:
                scorer.save(path / scorer_file(tta))
        if metrics is not None:
            _write_json(path / "metrics.json", metrics)
        for kind, specialist in self.specialists.items():
            specialist.save(path / self.config["specialists"][kind], half=half)
        return path

    def save_thresholds(self) -> Path:
        """Rewrite only ``thresholds.json`` of this model's folder (after re-tuning)."""
        if self.path is None:
            raise ModelError("this model has no folder; use save()")
        _write_json(self.path / "thresholds.json", self.thresholds)
        return self.path / "thresholds.json"

    # ---- backends ------------------------------------------------------------------------------
    def export_onnx(self, path: str | os.PathLike, opset: int = 17) -> Path:
        """Export image -> probability maps to ONNX with dynamic batch, height and width."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        maps_net = MapsNet(self.net, self.design).eval()
        dummy = torch.rand(1, 3, 64, 64)
        torch.onnx.export(maps_net, (dummy,), str(path), input_names=["image"], output_names=["maps"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "maps": {0: "batch", 2: "height", 3: "width"}},
                          opset_version=opset, dynamo=False)
        return path

    def use_backend(self, backend: str, onnx_path: str | os.PathLike | None = None, threads: int | None = None) -> None:
        """Switch between 'torch' and 'onnx' (exported next to the model or in the cache if needed)."""
        if backend == "torch":
            self._runner = TorchRunner(MapsNet(self.net, self.design))
        elif backend == "onnx":
            if onnx_path is None:
                onnx_path = self._cached_onnx()
            self._runner = OnnxRunner(str(onnx_path), threads=threads)
        else:
            raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'onnx'")
        self.backend = backend
        for specialist in self.specialists.values():
            specialist.use_backend(backend, threads=threads)

    def _cached_onnx(self) -> Path:
        from .weights import cache_dir

        if self.path is not None and (self.path / "model.onnx").is_file():
            return self.path / "model.onnx"
        digest = _weights_digest(self.net)
        target = cache_dir() / "onnx" / f"{digest}.onnx"
        if not target.is_file():
            tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.onnx")
            self.export_onnx(tmp)
            os.replace(tmp, target)
        return target

    # ---- prediction ------------------------------------------------------------------------------
    def for_type(self, kind: str) -> "Model":
        """The model that segments images of type ``kind``: its specialist, else this model."""
        return self.specialists.get(kind, self)

    def specialist_for(self, image: np.ndarray | Sequence[np.ndarray], scale: tuple[float, float] | None = None) -> "Model":
        """The model for a raw image (or windows of one image, by majority): the specialist for its type
        (:func:`transforms.image_type`, judged on a subsample normalised as ``predict`` normalises), else this model."""
        if not self.specialists:
            return self
        from collections import Counter

        norm = self.config["normalization"]
        kinds = []
        for window in [image] if isinstance(image, np.ndarray) else image:
            step = max(1, int(np.sqrt(window.shape[0] * window.shape[1] / 2**20)))  # ~1M pixels decide the type
            view = np.asarray(window[::step, ::step])
            window_scale = scale if scale is not None else intensity_scale(view, norm)
            kinds.append(image_type(normalize(view, norm, window_scale), norm, is_inverted(window_scale)))
        return self.for_type(Counter(kinds).most_common(1)[0][0])

    def predict_maps(self, image: np.ndarray, tta: bool = False, tile_size: int | None = None,
                     scale: tuple[float, float] | None = None) -> np.ndarray:
        """Probability maps (C, H, W) for a raw (H, W) or (H, W, 3) image of any dtype and size.

        ``scale``: fixed intensity (offset, scale), e.g. of a whole image when this is one of its blocks
        (give a block of a grey image as 2-D: see :func:`transforms.normalize`). Always this model's network, never a
        specialist's: ``model.specialist_for(image).predict_maps(image)`` gives the maps ``predict`` would use.
        """
        return self.maps_from_normalized(normalize(image, self.config["normalization"], scale), tta, tile_size)

    def maps_from_normalized(self, image: np.ndarray, tta: bool = False, tile_size: int | None = None) -> np.ndarray:
        """Probability maps for an image already normalised with this model's settings (H, W, 3)."""
        inf = self.config.get("inference", {})
        return predict_maps(self._runner, image, tile_size=tile_size or inf.get("tile_size", TILE_SIZE),
                            overlap=inf.get("tile_overlap", TILE_OVERLAP), tta=tta, vectors=vector_channels(self.design),
                            rays=ray_channels(self.design))

    def rescale_factor(self, diameter: float | None) -> float:
        """Image zoom that brings nuclei of ``diameter`` pixels to the size the model was trained on."""
        if diameter is None:
            return 1.0
        if isinstance(diameter, (str, bool)) or not float(diameter) > 0:
            raise ValueError(f"diameter must be a positive number of pixels, 'auto' or None, not {diameter!r}")
        trained = self.config.get("nucleus_diameter")
        if not trained:
            raise ModelError(f"{self.path or 'model'}: its config records no nucleus_diameter, so --diameter "
                             "cannot be used; rescale the images yourself")
        return float(trained) / float(diameter)

    def estimate_diameter(self, image: np.ndarray | Sequence[np.ndarray], tile_size: int | None = None,
                          scale: tuple[float, float] | None = None, zoom: float = PROBE_ZOOM) -> float:
        """Median nucleus diameter (pixels of ``image``) from a quick pass over the image zoomed by ``zoom``
        (default ``PROBE_ZOOM``: 1/16 of the pixels), where nuclei far larger than the trained ones are in the
        trained range (Cellpose estimates sizes too, with a learnt size model); 0 when that pass finds
        fewer than ``AUTO_MIN_NUCLEI`` nuclei. A list of windows of one image pools their nuclei."""
        from .data import median_diameter

        windows = [image] if isinstance(image, np.ndarray) else list(image)
        labels = [self._predict_zoomed(w, zoom, tile_size=tile_size, scale=scale, zoom_back=False) for w in windows]
        found = sum(int(lab.max()) for lab in labels)
        return median_diameter(labels) / zoom if found >= AUTO_MIN_NUCLEI else 0.0

    def auto_diameter(self, image: np.ndarray | Sequence[np.ndarray], tile_size: int | None = None,
                      scale: tuple[float, float] | None = None) -> float | None:
        """The diameter ``diameter='auto'`` segments ``image`` at: its estimated nucleus diameter when that
        exceeds ``AUTO_ZOOM_ABOVE`` times the trained one, and a second estimate at ``CONFIRM_ZOOM`` does too
        (the first pass at 1/4 can merge close nuclei of DSB2018's own size into large ones), else None (the
        image as it is). The second pass runs only on images the first would zoom."""
        trained = self.config.get("nucleus_diameter")
        if not trained:
            return None
        estimate = self.estimate_diameter(image, tile_size=tile_size, scale=scale)
        if estimate <= AUTO_ZOOM_ABOVE * trained:
            return None
        confirmed = self.estimate_diameter(image, tile_size=tile_size, scale=scale, zoom=CONFIRM_ZOOM)
        return estimate if confirmed > AUTO_ZOOM_ABOVE * trained else None

    def resolve_diameter(self, diameter: float | str | None, image: np.ndarray | Sequence[np.ndarray],
                         tile_size: int | None = None, scale: tuple[float, float] | None = None) -> float | None:
        """The diameter to segment at: 'auto' -> :meth:`auto_diameter` of ``image`` (or of windows of it),
        a number or None as given."""
        if not isinstance(diameter, str):
            return diameter
        if diameter != "auto":
            raise ValueError(f"diameter must be a positive number of pixels, 'auto' or None, not {diameter!r}")
        return self.auto_diameter(image, tile_size=tile_size, scale=scale)

    def predict(self, image: np.ndarray, tta: bool = False, tile_size: int | None = None,
                thresholds: dict | None = None, scale: tuple[float, float] | None = None,
                diameter: float | str | None = "auto", route: bool = True) -> np.ndarray:
        """Instance labels (H, W) for a raw image: 0 background, 1..N one label per nucleus.

        ``diameter``: typical nucleus diameter in this image (pixels): the image is zoomed to the trained
        size (``config['nucleus_diameter']``) for the network and post-processing, and the labels are
        zoomed back (like Cellpose's diameter). 'auto' (default): measured by a quick first pass and used
        only when the nuclei are far larger than the trained ones (:meth:`auto_diameter`); None: as it is.
        Images with more than ``inference.block_size`` squared pixels are segmented block by block
        (:mod:`nucleiseg.blocks`), so memory stays bounded by the block size. ``route``: hand the image to
        the specialist for its type when this model has one (:meth:`specialist_for`); False: this model's network
        (for blocks or zoomed copies of an image routed already).
        """
        if route:
            model = self.specialist_for(image, scale)
            if model is not self:
                return model.predict(image, tta=tta, tile_size=tile_size, thresholds=thresholds, scale=scale,
                                     diameter=diameter, route=False)
        diameter = self.resolve_diameter(diameter, image, tile_size=tile_size, scale=scale)
        factor = self.rescale_factor(diameter)
        if abs(factor - 1.0) > 0.02:
            return self._predict_zoomed(image, factor, tta=tta, tile_size=tile_size, thresholds=thresholds, scale=scale)
        block = self.config.get("inference", {}).get("block_size", 4096)
        if image.shape[0] * image.shape[1] > block * block:
            from .blocks import segment_blocks

            labels = np.zeros(image.shape[:2], np.uint32 if image.shape[0] * image.shape[1] >= 2**31 else np.int32)
            segment_blocks(self, image, labels, block=block // 2, halo=self.config["inference"].get("tile_overlap", TILE_OVERLAP),
                           scale=scale, tile_size=tile_size, tta=tta, thresholds=thresholds)
            return labels
        maps = self.predict_maps(image, tta=tta, tile_size=tile_size, scale=scale)
        return self.segment(maps, self.thresholds_for(tta, thresholds), tta)

    def _predict_zoomed(self, image: np.ndarray, factor: float, thresholds: dict | None = None, zoom_back: bool = True,
                        tta: bool = False, **kwargs) -> np.ndarray:
        from skimage.segmentation import relabel_sequential
        from skimage.transform import resize

        h, w = image.shape[:2]
        size = (max(1, round(h * factor)), max(1, round(w * factor))) + image.shape[2:]
        zoomed = resize(image.astype(np.float32), size, order=1, preserve_range=True, anti_aliasing=factor < 1)
        t = self.thresholds_for(tta, thresholds)
        t["min_size"] = t["min_size"] * factor ** 2  # the size limit is in pixels of the original image
        labels = self.predict(zoomed.astype(np.float32, copy=False), tta=tta, thresholds=t, diameter=None, route=False,
                              **kwargs)
        if not zoom_back:
            return labels
        back = resize(labels, (h, w), order=0, preserve_range=True, anti_aliasing=False).astype(labels.dtype)
        return relabel_sequential(back)[0]  # a nucleus thinner than a pixel after zooming out may vanish

    def predict_many(self, paths: Iterable[str | os.PathLike], channel: int | None = None,
                     **kwargs) -> Iterator[tuple[Path, np.ndarray | Exception]]:
        """Yield (path, labels) for each file, or (path, error) for files that cannot be read."""
        for p in paths:
            try:
                image = read_image(p, channel=channel)
            except ValueError as exc:
                yield Path(p), exc
                continue
            yield Path(p), self.predict(image, **kwargs)


def attach_specialist(folder: str | os.PathLike, kind: str, source: str | os.PathLike) -> Path:
    """Copy the model folder ``source`` into ``folder``/``kind`` as the specialist for images of type ``kind``
    and record it in ``folder``'s config.json (a specialist there before is replaced). Both are validated first."""
    import shutil

    folder, source = Path(folder), Path(source)
    if folder.resolve() == DEFAULT_MODEL_DIR.resolve():
        raise ModelError("the bundled model is not changed in place: copy its folder and give the copy")
    model, specialist = Model.load(folder), Model.load(source)
    model.add_specialist(kind, specialist)
    target = folder / kind
    if target.resolve() == source.resolve():
        raise ModelError(f"{source}: already in place; give a folder outside {folder}")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    _write_json(folder / "config.json", model.config)
    Model.load(folder)  # the folder as written loads
    return target


def load(path: str | os.PathLike | None = None, backend: str = "torch") -> Model:
    """Load a model folder (the bundled default model when ``path`` is None)."""
    return Model.load(path, backend=backend)


def _weights_digest(net: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def _write_json(path: Path, data: dict) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
