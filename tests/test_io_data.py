"""Reading every supported format and the three dataset layouts."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from nucleiseg.data import detect_layout, find_samples, load_sample, split
from nucleiseg.io import ImageError, read_image, read_labels
from nucleiseg.synthetic import nuclei_image
from nucleiseg.transforms import normalize

IMG16, LAB = nuclei_image((64, 80), n=6, seed=1)
IMG8 = (IMG16 // 257).astype(np.uint8)


def write(path, array):
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 and array.shape[-1] == 3 else "minisblack")
    else:
        Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("name,array,expected_shape,expected_dtype", [
    ("g8.png", IMG8, (64, 80), np.uint8),
    ("g16.png", IMG16, (64, 80), np.uint16),
    ("rgb.png", np.dstack([IMG8] * 3), (64, 80, 3), np.uint8),
    ("rgba.png", np.dstack([IMG8] * 3 + [np.full_like(IMG8, 255)]), (64, 80, 3), np.uint8),
    ("g16.tif", IMG16, (64, 80), np.uint16),
    ("f32.tif", IMG16.astype(np.float32) / 65535, (64, 80), np.float32),
    ("rgb16.tif", np.dstack([IMG16] * 3), (64, 80, 3), np.uint16),
    ("u32.tif", IMG16.astype(np.uint32) * 65537, (64, 80), np.uint32),
    ("i32.tif", IMG16.astype(np.int32) - 1000, (64, 80), np.int32),
    ("f64.tif", IMG16 / 65535.0, (64, 80), np.float32),  # float64 read as float32
    ("g.jpg", IMG8, (64, 80), np.uint8),
    ("rgb.jpg", np.dstack([IMG8] * 3), (64, 80, 3), np.uint8),
])
def test_read_formats(tmp_path, name, array, expected_shape, expected_dtype):
    image = read_image(write(tmp_path / name, array))
    assert image.shape == expected_shape and image.dtype == expected_dtype
    norm = normalize(image)
    assert norm.shape == (64, 80, 3) and norm.dtype == np.float32
    # the same picture in 8-bit and 16-bit gives (nearly) the same normalised input
    ref = normalize(IMG16)
    assert np.abs(norm - ref).mean() < 0.03


def test_multichannel_tiff_needs_channel(tmp_path):
    stack = np.stack([IMG16, np.zeros_like(IMG16), IMG16 // 2, IMG16 // 3])  # (C, H, W), as ImageJ writes
    path = write(tmp_path / "multi.tif", stack)
    with pytest.raises(ImageError, match="--channel"):
        read_image(path)
    assert np.array_equal(read_image(path, channel=2), IMG16 // 2)
    with pytest.raises(ImageError, match="out of range"):
        read_image(path, channel=7)


def test_stack_is_refused_with_axis(tmp_path):
    path = write(tmp_path / "z.tif", np.stack([IMG16] * 12))
    with pytest.raises(ImageError, match="axis 0"):
        read_image(path)


def test_layouts_detected_and_read(labels_dataset, kaggle_dataset, semantic_dataset):
    for root, layout, instances in [(labels_dataset, "labels", True), (kaggle_dataset, "kaggle", True),
                                    (semantic_dataset, "semantic", False)]:
        assert detect_layout(root) == layout
        found, samples = find_samples(root)
        assert found == layout and samples
        image, labels = load_sample(samples[0])
        assert image.shape[:2] == labels.shape and image.shape[2] == 3
        assert labels.max() > 1
        assert samples[0].instances == instances


def test_kaggle_masks_become_instances(kaggle_dataset):
    _, samples = find_samples(kaggle_dataset)
    _, labels = load_sample(samples[0])
    assert labels.max() == len(samples[0].masks)


def test_fixed_labels_preferred_and_missing_labels_skipped(labels_dataset):
    fixed = labels_dataset / "labels_lopuhin_fixed"
    fixed.mkdir()
    for p in sorted((labels_dataset / "labels").iterdir())[:-1]:
        (fixed / p.name).write_bytes(p.read_bytes())
    _, samples = find_samples(labels_dataset)
    assert len(samples) == 5 and all(s.labels.parent.name == "labels_lopuhin_fixed" for s in samples)
    _, samples = find_samples(labels_dataset, "labels")
    assert len(samples) == 6


def test_label_without_image_is_an_error(labels_dataset):
    (labels_dataset / "labels" / "ghost.png").write_bytes((labels_dataset / "labels" / "img00.png").read_bytes())
    with pytest.raises(ImageError, match="ghost.png.*label without its image"):
        find_samples(labels_dataset)


def test_label_size_mismatch_is_an_error(labels_dataset):
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(labels_dataset / "labels" / "img01.png")
    _, samples = find_samples(labels_dataset)
    with pytest.raises(ImageError, match="img01.png.*differs from image size"):
        load_sample(samples[1])


def test_split_is_seeded_and_complete():
    names = [f"n{i}" for i in range(50)]
    a = split(names, 0.2, seed=3)
    assert a == split(list(reversed(names)), 0.2, seed=3)
    assert len(a[1]) == 10 and sorted(a[0] + a[1]) == sorted(names)
    assert a != split(names, 0.2, seed=4)


def test_read_labels_rejects_negative(tmp_path):
    path = write(tmp_path / "neg.tif", np.array([[-1, 0], [0, 2]] * 8, np.int16).reshape(8, 4))
    with pytest.raises(ImageError):
        read_labels(path)


@pytest.mark.parametrize("strength", ["basic", "strong"])
def test_augmented_crops_keep_image_and_labels_aligned(strength):
    """Geometric augmentation moves image and labels together: a nucleus's pixels stay brighter than
    the background in every crop, and labels stay whole ids of the source image."""
    from nucleiseg.data import SegmentationDataset

    image, labels = nuclei_image((320, 320), n=40, seed=1)
    image = normalize(image)
    ds = SegmentationDataset([("syn", image, labels)], "distance", crop=128, augment=strength)
    ds.transform.set_random_seed(0)
    for _ in range(20):
        out = ds.transform(image=image, mask=labels)
        crop, lab = out["image"], out["mask"]
        assert crop.shape == (128, 128, 3) and lab.shape == (128, 128)
        assert set(np.unique(lab)) <= set(np.unique(labels))
        if (lab > 0).sum() > 200 and (lab == 0).sum() > 200:
            grey = crop.mean(axis=2)
            assert grey[lab > 0].mean() > grey[lab == 0].mean() + 0.1


def test_scale_range_enlarges_nuclei_within_its_bounds():
    """With a scale range of 1.5-2x, scaled crops show nuclei 2.25-4x their area; the others stay native."""
    from nucleiseg.data import augmentation

    yy, xx = np.mgrid[:320, :320]
    labels = np.zeros((320, 320), np.int32)
    for k, (cy, cx) in enumerate([(y, x) for y in range(20, 320, 40) for x in range(20, 320, 40)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k  # equal discs of radius 6, 113 px
    native = np.bincount(labels.ravel())[1]
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    transform = augmentation(128, "basic", scale_range=(1.5, 2.0))
    transform.set_random_seed(0)
    ratios = []
    for _ in range(30):
        lab = transform(image=normalize(image), mask=labels)["mask"]
        border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])))
        whole = [a for k, a in enumerate(np.bincount(lab.ravel()), start=0) if k and a and k not in border]
        ratios.append(np.median(whole) / native)
    ratios = np.array(ratios)
    assert (ratios > 2.0).sum() >= 5 and (ratios < 1.2).sum() >= 5  # scaled and native crops both drawn
    assert ratios.max() < 4.4 and not ((ratios > 1.2) & (ratios < 2.0)).any()


def test_unknown_augmentation_is_refused():
    from nucleiseg.data import augmentation

    with pytest.raises(ValueError, match="unknown augmentation"):
        augmentation(64, "heavy")


def test_grey_gammas_give_dim_nuclei_brightened_channels():
    """With ``grey_gammas`` a grey image (2-D, or RGB with equal channels) becomes x, x^0.5, x^0.25; a dim
    nucleus's contrast to a bright one rises in the gamma channels; colour images are left as they were."""
    from nucleiseg.transforms import is_grey

    image, labels = nuclei_image((128, 128), n=8, seed=3, dtype=np.uint16)
    image = image.astype(np.float64)
    image[labels == 1] *= 0.3  # one dim nucleus
    image = image.astype(np.uint16)
    settings = {"grey_gammas": [1, 0.5, 0.25]}
    out = normalize(image, settings)
    x = normalize(image)[..., 0]
    assert np.allclose(out[..., 0], x)
    assert np.allclose(out[..., 1], np.clip(x, 0, None) ** 0.5, atol=1e-6)
    assert np.allclose(out[..., 2], np.clip(x, 0, None) ** 0.25, atol=1e-6)
    dim, bright = labels == 1, labels == 2
    contrast = [out[..., c][dim].mean() / out[..., c][bright].mean() for c in range(3)]
    assert contrast[0] < contrast[1] < contrast[2]
    rgb_grey = np.repeat(image[..., None], 3, axis=2)
    assert is_grey(image) and is_grey(rgb_grey)
    x = normalize(rgb_grey)[..., 0]  # its own percentiles (of 3x the values: nearly the 2-D image's)
    expected = np.stack([x, np.clip(x, 0, None) ** 0.5, np.clip(x, 0, None) ** 0.25], axis=2)
    assert np.allclose(normalize(rgb_grey, settings), expected, atol=1e-6)
    colour = rgb_grey.copy()
    colour[..., 2] //= 2
    assert not is_grey(colour)
    assert np.array_equal(normalize(colour, settings), normalize(colour))


def test_image_type_sees_grey_gamma_channels_as_grey():
    """Image types (per-type evaluation, type-balanced crops) are the same whether or not grey images are
    normalised to gamma channels; a colour image is still histology."""
    from nucleiseg.evaluate import image_type
    from nucleiseg.training import crops_per_item

    settings = {"grey_gammas": [1, 0.5, 0.25]}
    fluo, _ = nuclei_image((96, 96), n=6, seed=1, dtype=np.uint16)
    bright = (fluo.max() - fluo).astype(np.uint16)  # dark nuclei on a bright background
    rng = np.random.default_rng(0)
    colour = np.stack([bright, bright // 2, (bright * 0.8).astype(np.uint16)], axis=2)
    colour = (colour + rng.integers(0, 2000, colour.shape)).astype(np.uint16)
    raw = {"fluorescence": fluo, "brightfield": bright, "histology": colour}
    for kind, image in raw.items():
        assert image_type(normalize(image)) == kind
        assert image_type(normalize(image, settings), settings) == kind
        assert image_type(normalize(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image, settings),
                          settings) == kind
    assert image_type(normalize(fluo, settings)) == "histology"  # without the settings: seen as coloured
    items = [(k, normalize(image), None) for k, image in raw.items()] * 2 + [("f", normalize(fluo), None)] * 4
    gamma_items = [(k, normalize(image, settings), None) for k, image in raw.items()] * 2 + \
        [("f", normalize(fluo, settings), None)] * 4
    counts = crops_per_item(items, 2, type_balance=0.5)
    assert counts.min() < counts.max()
    assert np.array_equal(crops_per_item(gamma_items, 2, type_balance=0.5, normalization=settings), counts)


def test_invert_auto_turns_bright_backgrounds_dark(tmp_path):
    """``"invert": "auto"`` inverts brightfield and stained images (bright background) and leaves fluorescence
    as it is; a block normalised with the whole image's scale is inverted as the whole image is."""
    from nucleiseg.transforms import intensity_scale, is_inverted

    settings = {"invert": "auto"}
    fluo, lab = nuclei_image((96, 96), n=6, seed=1, dtype=np.uint16)
    bright = (fluo.max() - fluo).astype(np.uint16)  # dark nuclei on a bright background
    colour = np.stack([bright, bright // 2, (bright * 0.8).astype(np.uint16)], axis=2)
    assert np.array_equal(normalize(fluo, settings), normalize(fluo))
    assert not is_inverted(intensity_scale(fluo, settings))
    for image in (bright, colour):
        assert is_inverted(intensity_scale(image, settings)) and not is_inverted(intensity_scale(image))
        x = normalize(image, settings)
        assert np.allclose(x, 1 - normalize(image), atol=1e-5)
        assert x[lab > 0].mean() > x[lab == 0].mean() + 0.3  # nuclei now bright on dark
    whole = normalize(bright, settings)
    block = normalize(bright[20:60, 30:90], settings, scale=intensity_scale(bright, settings))
    assert np.allclose(block, whole[20:60, 30:90], atol=1e-6)
    with pytest.raises(ValueError, match="invert"):
        intensity_scale(fluo, {"invert": "always"})


def test_image_types_are_judged_before_inversion(tmp_path):
    """An inverted brightfield image looks like fluorescence (grey on dark): ``load_items`` reports its type
    as judged before the inversion, and type-balanced crops use those types."""
    from nucleiseg.data import load_items
    from nucleiseg.evaluate import image_type
    from nucleiseg.training import crops_per_item

    settings = {"invert": "auto"}
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(4):
        fluo, lab = nuclei_image((64, 64), n=5, seed=i, dtype=np.uint16)
        image = (fluo.max() - fluo).astype(np.uint16) if i == 0 else fluo  # one brightfield, three fluorescence
        tifffile.imwrite(root / "images" / f"im{i}.tif", image)
        Image.fromarray(lab.astype(np.uint16)).save(root / "labels" / f"im{i}.png")
    _, samples = find_samples(root)
    types: dict[str, str] = {}
    items = load_items(samples, settings, progress=False, types=types)
    assert types == {"im0": "brightfield", "im1": "fluorescence", "im2": "fluorescence", "im3": "fluorescence"}
    assert image_type(items[0][1], settings) == "fluorescence"  # what the inverted pixels alone would say
    counts = crops_per_item(items, 2, type_balance=0.5, normalization=settings, types=types)
    assert counts[0] > counts[1] == counts[2] == counts[3]
